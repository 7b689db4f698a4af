"""The model longlab ships: ``longlab.load("tiny")`` and ``longlab.model_path("tiny")``.

The files are a plain Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json), so
``AutoModelForCausalLM.from_pretrained(longlab.model_path("tiny"))`` works without longlab.
"""

from __future__ import annotations

import json
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


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")  # any one


def weight_files(path: Path) -> list[Path]:
    """A checkpoint folder's weight files (safetensors or PyTorch), sorted by name."""
    return sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})


def tokenizer_files(path: Path) -> list[Path]:
    """The files a tokenizer is read from (vocabulary, merges, configuration, chat templates)."""
    names = {*TOKENIZER_FILES, "tokenizer_config.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
             "chat_template.json", "chat_template.jinja"}  # fmt: skip
    found = [path / n for n in names if (path / n).is_file()]
    found += [f for f in (path / "additional_chat_templates").glob("*.jinja") if f.is_file()]
    return sorted(found)


def checkpoint(name_or_path: str | Path) -> Path:
    """The folder of a bundled model name or a local checkpoint, checked before anything is loaded:
    it exists and holds config.json, weights and a tokenizer; else a :class:`LonglabError` that says
    what is missing."""
    if str(name_or_path) in BUNDLED:
        return model_path(str(name_or_path))
    path = Path(name_or_path)
    if not path.exists():
        raise LonglabError(
            f"model {str(name_or_path)!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing folder"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LonglabError(f"model {str(name_or_path)!r} is not a checkpoint folder: it has no config.json")
    if not weight_files(path):
        raise LonglabError(
            f"model folder {str(name_or_path)!r} has config.json but no weights (*.safetensors or *.bin)"
        )
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise LonglabError(
            f"model folder {str(name_or_path)!r} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return path


CARRIED_METHOD_KEY = "longlab_method"  # config.json key: the position method a checkpoint was fine-tuned with


def carried_method(path: Path) -> str | None:
    """The spec string a fine-tuned checkpoint's config.json carries (``longlab finetune``), or None."""
    return json.loads((path / "config.json").read_text()).get(CARRIED_METHOD_KEY)


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
    path = checkpoint(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(target).eval()
    return model, AutoTokenizer.from_pretrained(path)
