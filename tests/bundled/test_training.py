"""The training recipe: deterministic batches, checkpoints, and exact resume after interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longlab.bundled import train as training
from longlab.data.corpus import documents, split_of

SMALL = training.Recipe(
    vocab_size=600, hidden_size=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate_size=64,
    context=256, batch_size=2, steps=4, warmup_steps=2, checkpoint_every=2, validate_every=2,
    validation_windows=2, shortest_exercise=200,
)  # fmt: skip


def _small_corpus(folder: Path) -> None:
    """A few real documents per split, in the layout `longlab corpus` writes."""
    folder.mkdir(parents=True)
    wanted = {"train": 40, "validation": 4, "test": 4}
    files = {split: (folder / f"{split}.jsonl").open("w") for split in wanted}
    for name, text in documents():
        split = split_of(name)
        if wanted[split]:
            files[split].write(json.dumps({"name": name, "text": text[:20000]}) + "\n")
            wanted[split] -= 1
        if not any(wanted.values()):
            break
    for f in files.values():
        f.close()
    (folder / "manifest.json").write_text("{}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    _small_corpus(out / "corpus")
    final = training.train(out, SMALL)
    return out, torch.load(out / "checkpoint" / "state.pt", weights_only=False)["model"], final


def test_batches_depend_only_on_seed_and_step(uninterrupted):
    out, _, _ = uninterrupted
    corpus, tokenizer = training.prepare(out, SMALL)
    text = training.tokenize_split(tokenizer, corpus, "train")
    batches = training.Batches(SMALL, tokenizer, text)
    assert torch.equal(batches(3), training.Batches(SMALL, tokenizer, text)(3))
    assert not torch.equal(batches(3), batches(4))
    assert batches(3).shape == (SMALL.batch_size, SMALL.context)


def test_interrupted_run_resumes_to_the_same_weights(uninterrupted, tmp_path, monkeypatch):
    _, expected, _ = uninterrupted
    _small_corpus(tmp_path / "corpus")
    original = training.Batches.__call__

    def interrupt_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(training.Batches, "__call__", interrupt_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        training.train(tmp_path, SMALL)
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(training.Batches, "__call__", original)
    training.train(tmp_path, SMALL)
    resumed = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["model"]
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    # step 3 ran after the last checkpoint, so it runs again; the log is appended, never rewritten
    assert [entry["step"] for entry in log] == [1, 2, 3, 3, 4]
    assert log[2]["loss"] == log[3]["loss"]


def test_resume_with_another_recipe_is_refused(uninterrupted):
    out, _, _ = uninterrupted
    with pytest.raises(ValueError, match="another recipe"):
        training.train(out, training.Recipe(**{**SMALL.__dict__, "learning_rate": 1e-4}))


def test_final_checkpoint_is_a_plain_hugging_face_folder(uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, final = uninterrupted
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.max_position_embeddings == SMALL.context
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 4096")["input_ids"])[-4:] == ["4", "0", "9", "6"]


def test_training_on_a_device_creates_no_tensor_off_it_and_matches(uninterrupted, tmp_path, strict_device):
    """``train(device=...)``: every tensor follows the model's device (strict_device), and the run
    gives the same weights as the default one."""
    _, expected, _ = uninterrupted
    _small_corpus(tmp_path / "corpus")
    training.prepare(tmp_path, SMALL)  # corpus and tokenizer are host-side work, built before
    with strict_device():
        training.train(tmp_path, SMALL, device="cpu")
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["model"]
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, msg=name)


@pytest.mark.cuda
def test_training_on_cuda_runs_and_learns(tmp_path):
    _small_corpus(tmp_path / "corpus")
    training.train(tmp_path, SMALL, device="cuda")
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == SMALL.steps and all(torch.isfinite(torch.tensor(e["loss"])) for e in log)


def test_training_passkeys_keep_the_format_the_shipped_checkpoint_was_trained_on():
    """The evaluation's passkey default moved to Landmark's keys and character-cut filler; the recipe
    pins the earlier format (5-digit keys, whole filler sentence groups) so training stays reproducible."""
    import random

    from transformers import AutoTokenizer

    import longlab
    from longlab.data import synthetic

    tokenizer = AutoTokenizer.from_pretrained(longlab.model_path("tiny"))
    sample = training.EXERCISES["passkey"](tokenizer, 300, random.Random(3))
    filler = synthetic.NOISE
    key = sample.answers[0]
    # the prompt the recipe has always built: whole filler groups around the needle, a 5-digit key
    rng = random.Random(3)
    expected_key, depth = str(rng.randint(10**4, 10**5 - 1)), rng.random()
    assert key == expected_key and sample.meta["depth"] == depth
    lines = sample.prompt.split("\n")
    assert set(lines[1].split(filler)) <= {"", " "} and set(lines[3].split(filler)) <= {"", " "}
    assert lines[2] == f"The pass key is {key}. Remember it. {key} is the pass key."
