"""Model-level switch: run the package's DiT with its token sequence sharded over a process group."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attention import MODES, context_parallel_attention
from .comm import check_group
from .sharding import gather_sequence, shard_sequence


@dataclass(frozen=True)
class ContextParallelConfig:
    """What a DiT (and its Attention modules) do under context parallelism: tokens (B, N, C) are sharded
    along N after patch embedding (+ position embedding) and gathered before the final layer; attention
    runs ``context_parallel_attention`` on the shards."""

    group: object = None
    mode: str = "ring"
    load_balance: bool = False

    def shard(self, h: torch.Tensor) -> torch.Tensor:
        return shard_sequence(h, self.group, dim=1, load_balance=self.load_balance)

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        return gather_sequence(h, self.group, dim=1, load_balance=self.load_balance)

    def attention(self, q, k, v, **kw) -> torch.Tensor:
        return context_parallel_attention(q, k, v, group=self.group, mode=self.mode,
                                          load_balance=self.load_balance, **kw)


class ContextParallelHandle:
    """Returned by :func:`context_parallel`: ``remove()`` (or leaving the ``with`` block) restores the
    modules' previous settings."""

    def __init__(self, previous):
        self._previous = previous

    def remove(self) -> None:
        for module, value in self._previous:
            if value is None:
                module.__dict__.pop("context_parallel_config", None)
            else:
                module.context_parallel_config = value
        self._previous = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def context_parallel(model: nn.Module, group=None, mode: str = "ring", load_balance: bool = False):
    """Switch ``model`` (a ``flowmap_kernels.nn.DiT``, or any module containing DiTs / Attention modules) to
    context parallelism over ``group``; a setter that also works as a context manager::

        with context_parallel(model, group, mode="ulysses"):
            v = model(x, s, t, y)           # every rank passes the same full inputs, gets the full output

    Each rank computes the embeddings of the full input, keeps its share of the tokens through the blocks
    and gathers them before the final layer. Gradients: every rank runs the same loss; the gradient of any
    parameter or input averaged over ``group`` is exact (the convention of data-parallel training whose
    mesh includes the context-parallel ranks; see ``gather_sequence``).
    """
    from ..nn import DiT
    from ..nn.layers import Attention

    check_group(group)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    targets = [m for m in model.modules() if isinstance(m, (DiT, Attention))]
    if not any(isinstance(m, DiT) for m in targets):
        raise ValueError("model: contains no flowmap_kernels.nn.DiT (the switch shards a DiT's token sequence)")
    if mode == "ulysses":
        world = dist.get_world_size(group)
        for m in targets:
            if isinstance(m, Attention) and m.num_heads % world:
                raise ValueError(f"mode: 'ulysses' needs num_heads ({m.num_heads}) divisible by the group size "
                                 f"({world}); use mode='ring'")
    config = ContextParallelConfig(group, mode, bool(load_balance))
    previous = [(m, m.__dict__.get("context_parallel_config")) for m in targets]
    for m in targets:
        m.context_parallel_config = config
    return ContextParallelHandle(previous)
