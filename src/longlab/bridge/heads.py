"""Head scores for the head-aware cache policies, measured with the model itself and cached on disk.

``duo`` and ``razor`` split the KV heads into retrieval heads and local heads from a measurement on the
model (docs/cache.md, "Head-aware policies"). ``apply`` calls :func:`prepare` before it patches the
model: it reads the scores from a JSON file keyed by the weights and the procedure's parameters, or
measures them (a few seconds on the bundled model) and writes that file, so a second run reuses them.

Procedures (each a training-free stand-in for what the paper does, named in the policy's docstring):

- ``passkey_loss`` (DuoAttention): on ``samples`` passkey prompts of ``probe`` tokens, the loss of the
  answer's tokens when one KV head alone keeps only sinks + recent tokens, minus the loss with the
  whole cache; the prompt's last 8 tokens and the answer are fed after the context was cached (and
  evicted), so the question reads the context through the evicted cache as decoding would.
- ``echo_induction`` (RazorAttention, section 3.3): attention of every query of the second copy of a
  repeated random-token sequence to the earlier copy of its own token (echo) and of the token that
  followed it (induction), averaged over queries and over the query heads of each KV head.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, DynamicCache

from longlab.bridge.patch import PREPARE, apply, reset, rope_config
from longlab.cache.heads import HeadAwarePolicy, head_aware_keep
from longlab.cache.policy import CachePolicy
from longlab.data.synthetic import passkey
from longlab.errors import LonglabError
from longlab.generation import encode

VERSION = 1  # bump when a procedure changes: old files are then measured again
QUESTION_TAIL = 8  # prompt tokens fed after the context was cached, with the answer
SAMPLED = 4096  # values read from each weight tensor for the digest
ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "rope_parameters", "rope_theta")  # fmt: skip


def weights_digest(model: torch.nn.Module) -> str:
    """Digest of the model as loaded: its architecture and, of every weight tensor, its name, shape,
    dtype and ``SAMPLED`` evenly strided values — the in-memory counterpart of
    ``longlab.eval.results.weights_digest`` (which reads files; a model may have none)."""
    digest = hashlib.sha256()
    config = {key: getattr(model.config, key, None) for key in ARCHITECTURE}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED)][:SAMPLED]
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def score_folder(policy: HeadAwarePolicy) -> Path:
    """Where score files live: the policy's ``scores`` folder, ``$LONGLAB_HEADS``, or ~/.cache/longlab/heads."""
    if policy.scores:
        return Path(policy.scores)
    if os.environ.get("LONGLAB_HEADS"):
        return Path(os.environ["LONGLAB_HEADS"])
    return Path.home() / ".cache" / "longlab" / "heads"


def procedure_parameters(model: torch.nn.Module, policy: HeadAwarePolicy) -> dict[str, Any]:
    """Everything that changes a policy's scores (its file's key besides the weights)."""
    if policy.procedure == "passkey_loss":
        probe = policy.probe or rope_config(model).original_length
        sink, recent = probe_window(policy, probe)
        return {"samples": policy.samples, "probe": probe, "seed": policy.seed, "sink": sink, "recent": recent}
    return {"probe": policy.probe, "seed": policy.seed}


def probe_window(policy: HeadAwarePolicy, probe: int) -> tuple[int, int]:
    """The streaming window a head gets while probed: the policy's, clipped so that it holds at most
    a sixteenth (sinks) plus a quarter (recent) of the probe — a window as long as the probe would
    evict nothing and measure nothing."""
    return min(policy.sink, probe // 16), min(policy.recent, probe // 4)


def score_file(model: torch.nn.Module, policy: HeadAwarePolicy) -> tuple[Path, dict[str, Any]]:
    key = {"version": VERSION, "weights": weights_digest(model), "procedure": policy.procedure,
           "parameters": procedure_parameters(model, policy)}  # fmt: skip
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return score_folder(policy) / f"{policy.procedure}-{key['weights']}-{name}.json", key


def head_scores(model: torch.nn.Module, policy: HeadAwarePolicy) -> torch.Tensor:
    """The policy's head scores, read from its score file or measured (and written there)."""
    path, key = score_file(model, policy)
    if path.is_file():
        stored = json.loads(path.read_text())
        if {k: stored.get(k) for k in key} == key:
            return torch.tensor(stored["scores"], dtype=torch.float64)
    measure = {"passkey_loss": passkey_loss, "echo_induction": echo_induction}[policy.procedure]
    scores = measure(model, policy, key["parameters"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({**key, "scores": scores.tolist()}, indent=1))
    partial.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    return scores


def prepare(model: torch.nn.Module, policy: CachePolicy | None) -> CachePolicy | None:
    """``apply``'s preparation step: a head-aware policy gets its retrieval heads; others pass."""
    if not isinstance(policy, HeadAwarePolicy) or getattr(policy, "_retrieval", None) is not None:
        return policy
    return policy.from_scores(head_scores(model, policy))


PREPARE.append(prepare)


# -- the procedures ------------------------------------------------------------------------------


def _tokenizer(model: torch.nn.Module):
    path = Path(str(getattr(model.config, "_name_or_path", "")))
    if not path.is_dir():
        raise LonglabError(
            "duo measures its head scores on passkey prompts, which needs the model's tokenizer: load the model "
            f"from a local folder (config._name_or_path is {str(path)!r}), or pass scores= to a folder holding "
            "its score file"
        )
    return AutoTokenizer.from_pretrained(path)


def _head_table(model: torch.nn.Module) -> tuple[int, int]:
    config = model.config
    return config.num_hidden_layers, config.num_key_value_heads


@torch.no_grad()
def passkey_loss(model: torch.nn.Module, policy: HeadAwarePolicy, params: dict[str, Any]) -> torch.Tensor:
    """(layers, KV heads): mean rise of the passkey answer's loss when that head alone is streaming."""
    tokenizer = _tokenizer(model)
    layers, heads = _head_table(model)
    device = model.get_input_embeddings().weight.device
    rng = random.Random(params["seed"])
    probe = dataclasses.replace(policy, sink=params["sink"], recent=params["recent"], chunk=None)
    everything = torch.ones(layers, heads, dtype=torch.bool)
    rise = torch.zeros(layers, heads, dtype=torch.float64)
    for _ in range(params["samples"]):
        sample = passkey(tokenizer, params["probe"], rng)
        ids = encode(tokenizer, sample.prompt).to(device)
        answer = tokenizer(" " + sample.answers[0], add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        # the prefill attends over everything whatever the heads keep, so it runs once; each trial
        # evicts from a copy of its cache exactly as the policy's compress would after that prefill
        apply(model, probe.with_retrieval(everything))
        context = DynamicCache()
        model(ids[:, :-QUESTION_TAIL], past_key_values=context, use_cache=True)
        base = _answer_loss(model, probe.with_retrieval(everything), context, ids, answer)
        for layer in range(layers):
            for head in range(heads):
                alone = everything.clone()
                alone[layer, head] = False
                rise[layer, head] += _answer_loss(model, probe.with_retrieval(alone), context, ids, answer) - base
    reset(model)
    return rise / params["samples"]


def _answer_loss(model: torch.nn.Module, policy: HeadAwarePolicy, context: DynamicCache, ids: torch.Tensor,
                 answer: torch.Tensor) -> float:  # fmt: skip
    """Loss of ``answer`` after the prompt's last tokens, reading ``context`` as ``policy`` keeps it."""
    apply(model, policy)
    cache = copy.deepcopy(context)
    for index, layer in enumerate(cache.layers):
        layer.policy = policy.for_layer(index)
        positions = layer.entries.dense("positions").long()
        retrieval = layer.policy.layer_retrieval(positions.device)
        layer.entries.keep(head_aware_keep(positions, positions >= 0, retrieval, policy.sink, policy.recent))
    tail = torch.cat((ids[:, -QUESTION_TAIL:], answer), dim=1)
    logits = model(tail, past_key_values=cache, use_cache=True).logits[0, QUESTION_TAIL - 1 : -1]
    return float(torch.nn.functional.cross_entropy(logits.double(), answer[0]))


@torch.no_grad()
def echo_induction(model: torch.nn.Module, policy: HeadAwarePolicy, params: dict[str, Any]) -> torch.Tensor:
    """(2, layers, KV heads): echo and induction scores on a random sequence repeated twice."""
    layers, heads = _head_table(model)
    config = model.config
    device = model.get_input_embeddings().weight.device
    special = {getattr(config, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")}
    allowed = torch.tensor([t for t in range(config.vocab_size) if t not in special])
    gen = torch.Generator().manual_seed(params["seed"])
    half = params["probe"] // 2
    tokens = allowed[torch.randint(len(allowed), (half,), generator=gen)]
    ids = torch.cat((tokens, tokens))[None].to(device)
    apply(model, "none")
    attentions = model(ids, output_attentions=True, use_cache=False).attentions
    reset(model)
    queries = torch.arange(half, 2 * half - 1, device=device)  # the second copy (the last has no successor)
    scores = torch.zeros(2, layers, heads, dtype=torch.float64)
    for layer, weights in enumerate(attentions):  # (1, Hq, T, T)
        grouped = weights[0].double().view(heads, -1, 2 * half, 2 * half).mean(dim=1)
        scores[0, layer] = grouped[:, queries, queries - half].mean(dim=-1).cpu()
        scores[1, layer] = grouped[:, queries, queries - half + 1].mean(dim=-1).cpu()
    return scores
