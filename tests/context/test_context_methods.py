"""Context methods: chunking, retrieval (hand-computed ids and order, a naive BM25), the chains' prompts
with scripted answers, compression's ratio and kept question, their errors, the tasks' prompt split,
and one `longlab eval` through the runner with ``rag``."""

from __future__ import annotations

import json
import math
import random

import bm25s
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from longlab.context import compress, map_reduce, map_rerank, refine, retrievers
from longlab.context.base import ContextQuery
from longlab.context.chunks import chunk_spans, chunk_text, join_spans
from longlab.context.llm import answer_logprob
from longlab.context.rag import Rag
from longlab.data import synthetic
from longlab.errors import LonglabError, SpecError
from longlab.eval import ruler
from longlab.eval.runner import EvalConfig, _check_before_work, run
from longlab.eval.tasks import parse_task
from longlab.generation import encode, generate_answers
from longlab.loading import load
from longlab.spec import compose

# Six chunks of exactly six words: with one token a word, chunk_size=6 cuts the context into them.
CHUNKS = [
    "the cat sat on the mat ",
    "penguins live near the cold pole ",
    "a train left the station early ",
    "bread is baked in hot ovens ",
    "penguins penguins swim in icy water ",
    "the market opens every sunday morning ",
]
QUESTION = "\nQuestion: where do penguins swim? Answer:"
INSTRUCTION = "Read the text.\n"


@pytest.fixture(scope="module")
def words():
    """A real fast tokenizer, one token per word (built here, nothing downloaded)."""
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for word in " ".join([*CHUNKS, QUESTION, INSTRUCTION, "x y z a b c"]).replace("?", " ? ").split():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def tiny():
    return load("tiny")


def query(context: str = "".join(CHUNKS)) -> ContextQuery:
    return ContextQuery(INSTRUCTION, context, QUESTION)


# -- chunks --------------------------------------------------------------------------------------


def test_chunks_are_token_spans_that_partition_the_text(words):
    assert chunk_text(words, "".join(CHUNKS), 6) == CHUNKS
    spans = chunk_spans(words, "".join(CHUNKS), 4, overlap=2)
    starts = [a for a, _ in spans]
    assert [len("".join(CHUNKS)[:s].split()) for s in starts] == list(range(0, 33, 2))  # every 2nd word
    assert join_spans("".join(CHUNKS), spans) == "".join(CHUNKS)  # all chunks: the text back
    assert join_spans("abcdef", [(4, 6), (0, 2), (1, 3)]) == "abc\nef"  # merged, in order, gaps marked


def test_chunks_of_the_bundled_tokenizer_partition_prose(tiny):
    _, tokenizer = tiny
    text = synthetic.landmark_garbage(3000)
    pieces = chunk_text(tokenizer, text, 50)
    assert "".join(pieces) == text
    assert all(synthetic.token_count(tokenizer, p) <= 51 for p in pieces)  # a cut may re-merge one token


# -- retrieval -----------------------------------------------------------------------------------


def naive_bm25(question: str, chunks: list[str], k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """Okapi BM25 as Lucene computes it (idf ln(1 + (N - df + 0.5) / (df + 0.5)); no (k1 + 1) factor,
    which scales every score alike), written out over bm25s's own tokenization of the texts."""
    docs = bm25s.tokenize(chunks, stopwords="en", show_progress=False, return_ids=False)
    terms = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
    average = sum(map(len, docs)) / len(docs)
    out = np.zeros(len(docs))
    for term in terms:
        df = sum(term in d for d in docs)
        if df == 0:
            continue
        idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(term)
            out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / average))
    return out


def test_bm25_matches_the_formula_and_returns_hand_computed_ids_in_document_order(words):
    got = retrievers.bm25_scores(QUESTION, CHUNKS)
    np.testing.assert_allclose(got, naive_bm25(QUESTION, CHUNKS), rtol=1e-5)
    assert got[4] > got[1] > 0 and got[[0, 2, 3, 5]].max() == 0  # chunk 4: "penguins" twice and "swim"
    rag = Rag(chunk_size=6, top_k=2)
    assert rag.retrieve(words, query()) == [1, 4]  # ranked 4 then 1; given back in document order
    assert rag.prompt(words, query()) == INSTRUCTION + CHUNKS[1] + "\n" + CHUNKS[4] + QUESTION
    assert Rag(chunk_size=6, top_k=1).retrieve(words, query()) == [4]
    assert Rag(chunk_size=6, top_k=6).prompt(words, query()) == INSTRUCTION + "".join(CHUNKS) + QUESTION


def test_dense_retriever_ranks_a_paraphrase_first():
    chunks = [
        "Bananas are a sweet yellow fruit.",
        "The committee met on Tuesday.",
        "Rain fell over the mountains.",
        "The automobile was manufactured ten years ago.",
        "She plays the violin well.",
    ]
    question = "How old is the car?"
    assert retrievers.bm25_scores(question, chunks).max() == 0  # no word in common: BM25 cannot tell
    dense = retrievers.dense_scores(question, chunks)
    assert retrievers.top_k(dense, 1) == [3]
    vectors = retrievers.wordllama().embed([question, *chunks])  # the library's own embeddings, unnormalised
    cosine = [float(np.dot(v, vectors[0]) / np.linalg.norm(v) / np.linalg.norm(vectors[0])) for v in vectors[1:]]
    np.testing.assert_allclose(dense, cosine, rtol=1e-4, atol=1e-5)


def test_hybrid_is_the_convex_combination_of_normalised_scores(words):
    dense, sparse = retrievers.dense_scores(QUESTION, CHUNKS), retrievers.bm25_scores(QUESTION, CHUNKS)

    def norm(x):
        return (x - x.min()) / (x.max() - x.min())

    for weight in (0.0, 0.3, 1.0):
        expected = weight * norm(dense) + (1 - weight) * norm(sparse)
        np.testing.assert_allclose(retrievers.hybrid_scores(QUESTION, CHUNKS, weight), expected, rtol=1e-6)
    ranks_bm25 = Rag(chunk_size=6, top_k=3, retriever="bm25").retrieve(words, query())
    assert Rag(chunk_size=6, top_k=3, retriever="hybrid", weight=0.0).retrieve(words, query()) == ranks_bm25
    ranks_dense = Rag(chunk_size=6, top_k=3, retriever="dense").retrieve(words, query())
    assert Rag(chunk_size=6, top_k=3, retriever="hybrid", weight=1.0).retrieve(words, query()) == ranks_dense


def test_rag_covering_every_chunk_answers_as_the_plain_model(tiny):
    model, tokenizer = tiny
    sample = synthetic.passkey(tokenizer, 400, random.Random(3))
    q = ContextQuery(*sample.parts)
    plain = generate_answers(model, tokenizer, [encode(tokenizer, sample.prompt)], 10, False)
    assert Rag(chunk_size=64, top_k=100).answer(model, tokenizer, [q], 10, False) == plain


# -- chains (scripted answers) -------------------------------------------------------------------


class Script:
    """A stand-in for ``complete``: records each prompt, answers from a script."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def __call__(self, model, tokenizer, prompts, new_tokens, first_line, chat=False, batch=8):
        self.prompts += prompts
        return [self.answers.pop(0) for _ in prompts]


def test_map_reduce_maps_every_chunk_then_combines_the_non_empty_answers(words, monkeypatch):
    script = Script(["pole", "", "", "", " water ", "", "near the pole"])
    monkeypatch.setattr(map_reduce, "complete", script)
    answer = map_reduce.MapReduce(chunk_size=6).answer(None, words, [query()], 8, True)
    assert answer == ["near the pole"]
    assert script.prompts[:6] == [INSTRUCTION + chunk + QUESTION for chunk in CHUNKS]
    assert script.prompts[6] == INSTRUCTION + "Answers found in parts of the text:\npole\nwater" + QUESTION


def test_map_reduce_collapses_answers_in_groups_that_fit_a_chunk(words):
    method = map_reduce.MapReduce(chunk_size=6)
    answers = ["a b", "c", "x y z", "a", "b"]  # 3, 2, 4, 2, 2 tokens with the newline
    groups = method.groups(words, answers)
    assert groups == [["a b", "c"], ["x y z", "a", "b"]]  # the lone last answer joins the group before


def test_refine_carries_the_answer_through_the_chunks(words, monkeypatch):
    script = Script([f"answer {i}" for i in range(6)])
    monkeypatch.setattr(refine, "complete", script)
    assert refine.Refine(chunk_size=6).answer(None, words, [query()], 8, True) == ["answer 5"]
    assert script.prompts[0] == INSTRUCTION + CHUNKS[0] + QUESTION
    for step in range(1, 6):
        context = CHUNKS[step] + f"\nAn earlier answer: answer {step - 1}"
        assert script.prompts[step] == INSTRUCTION + context + QUESTION


def test_map_rerank_keeps_the_answer_the_model_is_surest_of(words, monkeypatch):
    script = Script(["a", "b", "c", "d", "e", "f"])
    scores = {"a": -2.0, "b": -0.5, "c": -3.0, "d": -0.5, "e": -math.inf, "f": -1.0}
    monkeypatch.setattr(map_rerank, "complete", script)
    monkeypatch.setattr(map_rerank, "answer_logprob", lambda model, tok, prompt, answer, chat: scores[answer])
    assert map_rerank.MapRerank(chunk_size=6).answer(None, words, [query()], 8, True) == ["b"]  # tie: earlier
    assert script.prompts == [INSTRUCTION + chunk + QUESTION for chunk in CHUNKS]


@pytest.mark.parametrize("name", ["map_reduce", "refine", "map_rerank"])
def test_a_chain_over_one_chunk_is_the_plain_prompt(words, monkeypatch, name):
    module = {"map_reduce": map_reduce, "refine": refine, "map_rerank": map_rerank}[name]
    script = Script(["only"])
    monkeypatch.setattr(module, "complete", script)
    method = compose(f"{name}:chunk_size=64").context
    assert method.answer(None, words, [query()], 8, True) == ["only"]
    assert script.prompts == [INSTRUCTION + "".join(CHUNKS) + QUESTION]


def test_answer_logprob_is_the_mean_of_the_tokens_log_probabilities(tiny):
    model, tokenizer = tiny
    prompt, answer = "The pass key is 4711. What is the pass key? The pass key is", " 4711."
    ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with torch.no_grad():  # one forward pass per answer token, each over its own prefix
        logs = [
            float(torch.log_softmax(model(torch.tensor([ids[:t]])).logits[0, -1].double(), -1)[ids[t]])
            for t in range(start, len(ids))
        ]
    assert answer_logprob(model, tokenizer, prompt, answer) == pytest.approx(sum(logs) / len(logs), abs=1e-4)
    assert answer_logprob(model, tokenizer, prompt, "") == -math.inf


# -- compression ---------------------------------------------------------------------------------


def test_self_information_matches_prefix_by_prefix_scoring_in_windows(tiny, device, monkeypatch):
    model, _ = tiny
    model = model.to(device)
    ids = torch.randint(2, 1000, (40,), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(model.config, "max_position_embeddings", 16)  # windows of 16, advancing by 8
    got = compress.self_information(model, ids.to(device)).cpu()
    assert got.device.type == "cpu" and math.isinf(got[0])
    for t in range(1, 40):
        start = max(0, (t // 8 - 1) * 8)  # the window holding token t in its second half (or the first)
        with torch.no_grad():
            logits = model(ids[None, start:t].to(device)).logits[0, -1].float()
        assert float(got[t]) == pytest.approx(-float(logits.log_softmax(-1)[ids[t]]), abs=1e-3)
    model.to("cpu")


def test_drop_lowest_drops_the_least_informative_units_to_the_token_target():
    assert compress.drop_lowest([5.0, 1.0, 3.0, 2.0, math.inf], [1] * 5, 0.4) == {1, 3}
    # words of 2, 1, 3, 1 tokens; target 3 of 7: the lowest (size 3) fits, then nothing else does
    assert compress.drop_lowest([4.0, 2.0, 1.0, 3.0], [2, 1, 3, 1], 0.43) == {2}
    assert compress.drop_lowest([math.inf, math.inf], [1, 1], 0.5) == set()  # the unscored first token stays


@pytest.mark.parametrize("unit", ["token", "word"])
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_compress_hits_the_ratio_and_keeps_instruction_and_question(tiny, unit, ratio):
    model, tokenizer = tiny
    sample = synthetic.niah_single(tokenizer, 450, random.Random(5))
    instruction, context, question = sample.parts
    method = compress.Compress(ratio=ratio, unit=unit)
    prompt = method.prompt(model, ContextQuery(instruction, context, question))
    assert prompt.startswith(instruction) and prompt.endswith(question)
    kept = prompt[len(instruction) : len(prompt) - len(question)]
    removed = 1 - synthetic.token_count(tokenizer, kept) / synthetic.token_count(tokenizer, context)
    assert abs(removed - ratio) <= 0.05
    rest = iter(context)  # the kept text is a subsequence of the context: pieces in order, nothing added
    assert all(char in rest for char in kept)


def test_compress_drops_the_predictable_filler_before_the_needle(tiny):
    model, tokenizer = tiny
    sample = synthetic.passkey(tokenizer, 450, random.Random(2), garbage="sentences")
    kept = compress.Compress(ratio=0.5, unit="word").prompt(model, ContextQuery(*sample.parts))
    assert sample.answers[0] in kept  # the key is surprising; the repeated filler is not


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1", "0.0"])
def test_compress_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(SpecError, match=r"compress: parameter 'ratio' must be a number > 0 and < 1"):
        compose(f"compress:ratio={ratio}")


@pytest.mark.parametrize("spec", ["rag", "map_reduce", "refine", "map_rerank", "compress"])
def test_empty_context_and_missing_question_are_clear_errors(words, tiny, spec):
    model, _ = tiny
    method = compose(spec).context
    with pytest.raises(LonglabError, match=f"{spec}: the sample's context is empty"):
        method.answer(model, words, [ContextQuery(INSTRUCTION, "  \n", QUESTION)], 4, True)
    with pytest.raises(LonglabError, match=f"{spec}: the sample has no question"):
        method.answer(model, words, [ContextQuery(INSTRUCTION, "".join(CHUNKS), "")], 4, True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("rag:top_k=0", "rag: parameter 'top_k' must be an integer >= 1"),
        ("rag:retriever=splade", "rag: parameter 'retriever' must be one of bm25, dense, hybrid"),
        ("rag:chunk_size=8,overlap=8", "rag: parameter 'overlap' must be < 'chunk_size', got 8 and 8"),
        ("map_reduce:chunk_size=0", "map_reduce: parameter 'chunk_size' must be an integer >= 1"),
        ("compress:unit=phrase", "compress: parameter 'unit' must be one of token, word"),
    ],
)
def test_parameters_are_validated(spec, message):
    with pytest.raises(SpecError, match=message):
        compose(spec)


# -- tasks split their prompts -------------------------------------------------------------------


def _check_split(sample):
    instruction, context, question = sample.parts
    assert instruction + context + question == sample.prompt and context.strip() and question.strip()


def test_generation_tasks_split_prompts_into_instruction_context_and_question(tiny, tmp_path):
    _, tokenizer = tiny
    for spec, length in [("passkey", 300), ("niah:depths=2", 300)]:
        task = parse_task(spec)
        for sample in task.samples(task.subtasks()[0], tokenizer, length, 1, 0):
            _check_split(sample)
    for name in [*ruler.NEEDLE_TASKS, "vt", "cwe", "fwe"]:
        sample = ruler.sample(name, tokenizer, 1400, random.Random(0))
        _check_split(sample)
        assert sample.parts[2].startswith("\nWhat") or "Question" in sample.parts[2]
    rows = [{"context": "Alpha beta. " * 20, "input": "Which letter?", "answers": ["alpha"]}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (sample,) = parse_task(f"jsonl:path={path}").samples("jsonl/qa", tokenizer, 300, 1, 0)
    assert sample.parts == ("", rows[0]["context"], "\n\nQuestion: Which letter?\nAnswer:")
    _check_split(parse_task(f"jsonl:path={path}").samples("jsonl/qa", tokenizer, 110, 1, 0)[0])  # cut in the middle


def test_a_task_that_cannot_split_its_prompt_is_a_clear_error(tiny, tmp_path):
    _, tokenizer = tiny
    path = tmp_path / "long_question.jsonl"
    row = {"context": "word " * 10, "input": "why " * 200, "answers": ["x"]}
    path.write_text(json.dumps(row) + "\n")
    task = parse_task(f"jsonl:path={path}")
    (sample,) = task.samples("jsonl/long_question", tokenizer, 150, 1, 0)  # the cut falls in the question
    assert sample.parts is None
    with pytest.raises(LonglabError, match="gives no question apart from its context"):
        task.query("jsonl/long_question", sample)


# -- the runner ----------------------------------------------------------------------------------


def test_reach_check_counts_what_a_context_method_makes_the_model_read(tiny):
    model, _ = tiny
    config = EvalConfig()
    _check_before_work(model, [compose("rag:chunk_size=64,top_k=2+linear:factor=2")], [4096], config)
    with pytest.raises(LonglabError, match="the model reads up to 1280"):
        _check_before_work(model, [compose("map_reduce:chunk_size=1024+linear:factor=2")], [4096], config)


def test_eval_runs_rag_through_the_runner(tmp_path):
    out = tmp_path / "eval"
    method = "rag:chunk_size=32,top_k=2+yarn:factor=2"  # reach 1024: the model reads ~100 tokens of 2048
    run(EvalConfig(methods=[method], tasks=["passkey"], lengths=[2048], samples=2, out=str(out)))
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["method"] for r in rows} == {str(compose(method))}
    assert all(r["latency_s"] > 0 and 1900 < r["prompt_tokens"] <= 2048 for r in rows)
    assert [r["score"] for r in rows] == [100, 100]  # both keys found in 2 x 32 retrieved tokens
    assert f"| `{compose(method)}` |" in (out / "report.md").read_text()
    with pytest.raises(LonglabError, match="run context methods on generation tasks"):
        run(EvalConfig(methods=["rag"], tasks=["ppl"], lengths=[256], samples=1, out=str(tmp_path / "ppl")))
