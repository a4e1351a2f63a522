"""Checkpoints along a made-up training run, for tests that need a few distinct state_dicts of one model."""

from __future__ import annotations

import torch


def drifted_states(model: torch.nn.Module, n: int, step: float = 0.1) -> list[dict[str, torch.Tensor]]:
    """`n` state_dicts (cloned): the model's, then each after adding step * N(0, 1) noise (torch's global
    generator) to every parameter in place; the model is left after the n-th step."""
    states = []
    for _ in range(n):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step * torch.randn_like(p))
    return states
