"""Greedy generation through any causal LM for evaluation: prompts encoded (optionally in the chat
template), answers that stop at their natural end. Below the tasks and the context methods, which both
generate through it."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from longlab.errors import LonglabError


def check_chat_template(tokenizer) -> None:
    """Fail before any work when ``--chat`` is asked of a tokenizer that has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise LonglabError(f"--chat asks for a chat template, but the tokenizer of {name} has none; drop --chat")


def encode(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """(1, T) token ids of a prompt, optionally wrapped in the tokenizer's chat template."""
    if chat:
        check_chat_template(tokenizer)
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )  # transformers 5 returns a BatchEncoding whatever is asked; ask for it in every version
        ids = encoded["input_ids"] if not isinstance(encoded, torch.Tensor) else encoded
        return torch.as_tensor(ids).reshape(1, -1)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]


def chat_overhead(tokenizer) -> int:
    """Tokens the chat template adds around a prompt (the difference between an empty message
    wrapped and bare), so prompts can be sized to leave room for it."""
    return encode(tokenizer, "", chat=True).shape[1] - encode(tokenizer, "").shape[1]


class _Newline(StoppingCriteria):
    """Stop once every row's answer has a newline after its first line (the answer's natural end);
    newlines before any text do not count, as LongBench strips them before taking the first line."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer, self.width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = ["\n" in self.tokenizer.decode(row[self.width :]).lstrip("\n") for row in input_ids]
        return torch.tensor(done, device=input_ids.device)


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[torch.Tensor], new_tokens: int, first_line: bool = True
) -> list[str]:
    """Greedy answers for prompts of any lengths, left-padded into one batch: the first line (generation
    stops once every row has a newline), or with ``first_line=False`` the whole generation up to the
    budget or the end-of-sequence token, for tasks whose scoring reads past the first line."""
    width = max(p.shape[1] for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=model.device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1] :] = prompt[0].to(model.device)
        mask[row, width - prompt.shape[1] :] = 1
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=StoppingCriteriaList([_Newline(tokenizer, width)] if first_line else []),
    )  # fmt: skip
    answers = [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
    return [answer.lstrip("\n").split("\n")[0] for answer in answers] if first_line else answers
