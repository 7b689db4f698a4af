"""``longlab.load``: a checkpoint loaded and, when it carries a position method, patched with it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from longlab.bridge.patch import apply
from longlab.loading import carried_method, checkpoint
from longlab.loading import load as load_checkpoint


def load(
    name_or_path: str | Path = "tiny", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`longlab.loading.load`, then ``longlab.apply`` of the method the checkpoint's config
    carries (``longlab_method``, written by ``longlab finetune``): the model reads as it was trained."""
    model, tokenizer = load_checkpoint(name_or_path, dtype=dtype, device=device)
    spec = carried_method(checkpoint(name_or_path))
    if spec:
        apply(model, spec)
    return model, tokenizer
