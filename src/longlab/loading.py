"""The model longlab ships: ``longlab.load("tiny")`` and ``longlab.model_path("tiny")``.

The files are a plain Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json), so
``AutoModelForCausalLM.from_pretrained(longlab.model_path("tiny"))`` works without longlab.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from longlab.errors import LonglabError

BUNDLED = {
    "tiny": Path(__file__).parent / "bundled" / "tiny"
}  # data files; the pipeline that made them is longlab.bundled


def model_path(name: str = "tiny") -> Path:
    """Folder of a bundled model."""
    if name not in BUNDLED:
        raise LonglabError(f"no bundled model {name!r}; bundled: {', '.join(BUNDLED)}")
    path = BUNDLED[name]
    if not (path / "config.json").exists():
        raise LonglabError(f"bundled model {name!r} is missing its files at {path}; reinstall longlab")
    return path


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: cuda when a GPU is there, else cpu. Other devices than cpu and cuda are refused."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise LonglabError(f"device {str(device)!r} is not supported; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise LonglabError(f"device {str(device)!r} asked for, but this machine has no CUDA GPU; use cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        # caught here rather than as CUDA's "invalid device ordinal" halfway through loading
        count = torch.cuda.device_count()
        raise LonglabError(
            f"device {str(device)!r} asked for, but this machine has {count} GPU(s): cuda:0..{count - 1}"
        )
    return resolved


def load(
    name_or_path: str | Path = "tiny", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` for a bundled model name or a local checkpoint folder, in eval mode, on
    ``device``: the CPU in float32 unless asked otherwise (as before devices existed; ``"auto"``: cuda
    when available). An unsupported device fails here with a :class:`LonglabError`."""
    target = resolve_device(device)
    path = Path(name_or_path)
    if str(name_or_path) in BUNDLED:
        path = model_path(str(name_or_path))
    elif not (path / "config.json").exists():
        raise LonglabError(
            f"{str(name_or_path)!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a folder with config.json"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(target).eval()
    return model, AutoTokenizer.from_pretrained(path)
