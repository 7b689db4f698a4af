"""What a ``longlab finetune`` run is: the recipe dataclass, validated like a method."""

from __future__ import annotations

from dataclasses import dataclass

from longlab.errors import LonglabError
from longlab.method import check_range

RECIPES = ("full", "pose", "longlora")


@dataclass(frozen=True)
class FinetuneRecipe:
    """Everything that defines a fine-tuning run; resuming checks it is unchanged.

    ``full``: every weight trained at ``length`` tokens (Chen et al., 2023 PI; Peng et al., 2023 YaRN).
    ``pose``: rows of ``train_length`` tokens whose position ids cover ``length`` (Zhu et al., 2023).
    ``longlora``: LoRA on the attention projections plus trainable embeddings and norms, S²-Attn with
    groups of ``group_fraction * length`` at training time, full attention at inference (Chen et al.,
    2023, LongLoRA, section 3.2-3.3; group 1/4 of the length as in the paper).
    """

    method: str = "linear:factor=4"
    length: int = 2048
    recipe: str = "full"
    steps: int = 300
    batch_size: int = 2
    learning_rate: float = 5e-4
    final_lr_fraction: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1234
    checkpoint_every: int = 50
    train_length: int | None = None  # pose: the short window (default: the model's training length)
    pose_chunks: int = 2  # the paper's main setting
    group_fraction: float = 0.25
    lora_rank: int = 8
    lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise LonglabError(f"finetune: unknown recipe {self.recipe!r}; known recipes: {', '.join(RECIPES)}")
        name = "finetune"
        check_range(name, "length", self.length, low=2, integer=True)
        check_range(name, "steps", self.steps, low=1, integer=True)
        check_range(name, "batch_size", self.batch_size, low=1, integer=True)
        check_range(name, "learning_rate", self.learning_rate, low=0, low_open=True, high=1.0)
        check_range(name, "final_lr_fraction", self.final_lr_fraction, low=0, high=1)
        check_range(name, "warmup_steps", self.warmup_steps, low=0, integer=True)
        check_range(name, "weight_decay", self.weight_decay, low=0, high=1)
        check_range(name, "grad_clip", self.grad_clip, low=0, low_open=True)
        check_range(name, "checkpoint_every", self.checkpoint_every, low=1, integer=True)
        check_range(name, "train_length", self.train_length, low=2, integer=True)
        check_range(name, "pose_chunks", self.pose_chunks, low=1, integer=True)
        check_range(name, "group_fraction", self.group_fraction, low=0, low_open=True, high=1)
        check_range(name, "lora_rank", self.lora_rank, low=1, integer=True)
        check_range(name, "lora_alpha", self.lora_alpha, low=0, low_open=True)
        if self.recipe == "pose" and self.train_length is not None and self.train_length >= self.length:
            raise LonglabError(
                f"finetune: PoSE trains short to reach long: train_length ({self.train_length}) must be below "
                f"the target length ({self.length})"
            )

    def group_size(self) -> int:
        """LongLoRA's S²-Attn group: an even divisor of the length near ``group_fraction * length``."""
        group = max(2, int(self.length * self.group_fraction) // 2 * 2)
        while self.length % group:
            group -= 2
        if group < 2:
            raise LonglabError(f"finetune: longlora needs an even length to split into groups, got {self.length}")
        return group
