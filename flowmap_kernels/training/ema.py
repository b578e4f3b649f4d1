"""Exponential moving average of a model's parameters (the EMA copy is a full nn.Module).

Under FSDP2 the EMA module is sharded like the model (apply_fsdp on both, same mesh): the update then
runs on each rank's local shards, no communication."""
from __future__ import annotations

import copy

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (shares its storage), or the tensor itself."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


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
        for m in (self.module, model):  # FSDP2 modules left gathered (no reshard after forward): shard them
            if hasattr(m, "reshard") and hasattr(m, "unshard"):
                m.reshard()
        for e, p in zip(self.module.parameters(), model.parameters()):
            _local(e).lerp_(_local(p.detach()), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
