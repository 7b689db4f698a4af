"""``longlab corpus``: the training text every Python installation carries, split by file.

Documents are the standard library's ``.py`` sources and the topics of ``pydoc_data.topics`` (the
reference manual's prose). Each document goes to train / validation / test by a hash of its name,
so held-out files are never seen in training and the split is the same on every machine with the
same Python. ``manifest.json`` records every document's split, size and sha256.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SPLITS = ("train", "validation", "test")
# Test suites, GUI demos, bundled wheels and generated character tables are not representative text.
EXCLUDED_PARTS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "ensurepip", "encodings", "__pycache__"}
EXCLUDED_FILES = {"pydoc_data/topics.py"}  # its topics enter as prose documents instead


def split_of(name: str) -> str:
    """90% train, 5% validation, 5% test, decided by the document name's hash."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def documents() -> Iterator[tuple[str, str]]:
    """(name, text) for every document, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if EXCLUDED_PARTS.intersection(path.relative_to(root).parts) or relative in EXCLUDED_FILES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield f"stdlib/{relative}", text
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]


def build_corpus(out: Path) -> dict:
    """Write ``{split}.jsonl`` (one document per line) and ``manifest.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {split: (out / f"{split}.jsonl").open("w", encoding="utf-8") for split in SPLITS}
    manifest: dict = {"python": sys.version.split()[0], "documents": [], "totals": {s: 0 for s in SPLITS}}
    try:
        for name, text in documents():
            split = split_of(name)
            files[split].write(json.dumps({"name": name, "text": text}) + "\n")
            digest = hashlib.sha256(text.encode()).hexdigest()
            manifest["documents"].append({"name": name, "split": split, "chars": len(text), "sha256": digest})
            manifest["totals"][split] += len(text)
    finally:
        for f in files.values():
            f.close()
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_split(corpus: Path, split: str) -> list[str]:
    with (corpus / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def token_stream(tokenizer, texts) -> np.ndarray:
    """The documents' tokens concatenated, each followed by EOS (training and held-out perplexity)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int32)
