"""Exponential moving average of a model's parameters (the EMA copy is a full nn.Module)."""
from __future__ import annotations

import copy

import torch


class EMA:
    """ema <- d * ema + (1 - d) * model, with d = min(decay, (1 + n) / (10 + n)) after n updates
    (the warm-up keeps early EMA weights close to the model). Buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
