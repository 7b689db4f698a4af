"""Running a model for evaluation: encoding prompts, greedy answers that stop at their natural end,
and per-token losses computed without materialising the full logits."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


def encode(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """(1, T) token ids of a prompt, optionally wrapped in the tokenizer's chat template."""
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


class _Newline(StoppingCriteria):
    """Stop once every row's answer has reached a newline (the answer's natural end)."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = ["\n" in self.tokenizer.decode(row[self.width :]) for row in input_ids]
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[torch.Tensor], new_tokens: int) -> list[str]:
    """Greedy answers (first line) for prompts of any lengths, left-padded into one batch."""
    width = max(p.shape[1] for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1] :] = prompt[0].to(model.device)
        mask[row, width - prompt.shape[1] :] = 1
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id, stopping_criteria=StoppingCriteriaList([_Newline(tokenizer, width)]),
    )  # fmt: skip
    return [tokenizer.decode(row[width:], skip_special_tokens=True).split("\n")[0] for row in out]


@torch.no_grad()
def token_losses(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Next-token losses (T - 1,) of one sequence (1, T); logits are computed a chunk at a time."""
    ids = ids.to(model.device)
    hidden = model.model(ids).last_hidden_state[0]
    losses = []
    for start in range(0, ids.shape[1] - 1, chunk):
        logits = model.lm_head(hidden[start : min(start + chunk, ids.shape[1] - 1)]).float()
        targets = ids[0, start + 1 : start + 1 + logits.shape[0]]
        losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(losses)
