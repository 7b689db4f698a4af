"""Training a lab model for a few steps in tests: the loop every "the model trains" test shares."""

from __future__ import annotations

from collections.abc import Callable

import torch


def train_steps(
    model: torch.nn.Module,
    ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    after_backward: Callable[[torch.nn.Module], None] | None = None,
) -> list[float]:
    """The losses of ``steps`` optimizer steps on one repeated batch. ``after_backward(model)`` runs
    between each backward and its step (per-step gradient checks); the last step's gradients stay."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model.loss(ids)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
        losses.append(loss.item())
    return losses
