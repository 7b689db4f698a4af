"""Scoring chunks against a question: BM25 (bm25s), dense embeddings (WordLlama, whose weights and
tokenizer ship inside its package: nothing is downloaded), and their hybrid. Text in, one score per
chunk out (numpy, on the CPU: retrieval reads strings, not the model's tensors)."""

from __future__ import annotations

import functools
import importlib
import logging
from importlib import resources

import numpy as np

from longlab.errors import LonglabError

RETRIEVERS = ("bm25", "dense", "hybrid")
STOPWORDS = "en"
WORDLLAMA_CONFIG = "l2_supercat"  # the configuration whose weights and tokenizer the package carries
WORDLLAMA_DIM = 256


def _optional(module: str):
    """An optional dependency of the retrievers (the ``context`` extra), or a clear error naming it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LonglabError(f"rag's retrievers need {module.split('.')[0]}: pip install 'longlab[context]'") from None


def _tokenize(texts: list[str]) -> list[list[str]]:
    bm25s = _optional("bm25s")

    return bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False, return_ids=False)


def bm25_scores(question: str, chunks: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 (Robertson & Zaragoza, 2009, "The Probabilistic Relevance Framework: BM25 and
    Beyond", eq. 3.15) of each chunk for the question's words, stopwords dropped, in bm25s's default
    Lucene variant: idf ln(1 + (N - df + 0.5) / (df + 0.5)) and no (k1 + 1) factor (a constant scale)."""
    bm25s = _optional("bm25s")

    corpus = bm25s.tokenize(chunks, stopwords=STOPWORDS, show_progress=False)
    index = bm25s.BM25(k1=k1, b=b)
    index.index(corpus, show_progress=False)
    words = [w for w in _tokenize([question])[0] if w in corpus.vocab]  # words no chunk has score 0
    if not words:
        return np.zeros(len(chunks))
    return np.asarray(index.get_scores(words), dtype=np.float64)


@functools.cache
def wordllama():
    """The WordLlama model (Miller, 2024) from the files inside the ``wordllama`` package, read once.
    Loaded from those paths directly: ``WordLlama.load`` looks for the tokenizer in a folder the
    package does not have and would go to the network for it."""
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    try:
        from safetensors import safe_open

        WordLlama = _optional("wordllama").WordLlama
        WordLlamaInference = _optional("wordllama.inference").WordLlamaInference
    except ImportError:
        raise LonglabError("the dense retriever needs wordllama: pip install 'longlab[context]'") from None
    finally:  # wordllama calls logging.basicConfig on import; the host's logging is not its to set
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
    root = resources.files("wordllama")
    weights = root / "weights" / f"{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}.safetensors"
    tokenizer_file = root / "tokenizers" / f"{WORDLLAMA_CONFIG}_tokenizer_config.json"
    if not (weights.is_file() and tokenizer_file.is_file()):
        raise LonglabError(f"this wordllama package does not carry {weights.name} and {tokenizer_file.name}; "
                           "install wordllama 0.3.9, which ships both")  # fmt: skip
    with safe_open(str(weights), framework="np") as f:
        embedding = f.get_tensor("embedding.weight")
    return WordLlamaInference(embedding, WordLlama.load_tokenizer(tokenizer_file))


def dense_scores(question: str, chunks: list[str]) -> np.ndarray:
    """Cosine similarity between the question's and each chunk's WordLlama embedding."""
    vectors = np.asarray(wordllama().embed([question, *chunks], norm=True), dtype=np.float64)
    return vectors[1:] @ vectors[0]


def min_max(scores: np.ndarray) -> np.ndarray:
    """Scores mapped onto [0, 1] (all equal: all 0)."""
    spread = scores.max() - scores.min()
    return (scores - scores.min()) / spread if spread > 0 else np.zeros_like(scores)


def hybrid_scores(question: str, chunks: list[str], weight: float) -> np.ndarray:
    """The convex combination ``weight * dense + (1 - weight) * bm25`` of min-max normalised scores
    (Bruch, Gai & Ingber, 2023, "An Analysis of Fusion Functions for Hybrid Retrieval", section 4.1)."""
    return weight * min_max(dense_scores(question, chunks)) + (1 - weight) * min_max(bm25_scores(question, chunks))


def scores(retriever: str, question: str, chunks: list[str], weight: float = 0.5) -> np.ndarray:
    if retriever == "bm25":
        return bm25_scores(question, chunks)
    if retriever == "dense":
        return dense_scores(question, chunks)
    if retriever == "hybrid":
        return hybrid_scores(question, chunks, weight)
    raise LonglabError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")


def top_k(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` highest scores (ties: the earlier chunk), returned in document order."""
    ranked = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(ranked[:k])
