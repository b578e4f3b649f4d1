"""Model-level switch: run the package's DiT, or a diffusers DiT in a DiffusersFlowMap, with its token
sequence sharded over a process group."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .attention import MODES, context_parallel_attention
from .comm import check_group, check_load_balance, exchange_checked, world_and_rank
from .sharding import gather_sequence, shard_sequence


@dataclass(frozen=True)
class ContextParallelConfig:
    """What a DiT (and its Attention modules, or a DiffusersFlowMap's hooks and attention processors) do
    under context parallelism: tokens (B, N, C) are sharded along N after patch embedding (+ position
    embedding) and gathered before (DiT) or after (diffusers: the per-token output projection) the final
    layer; attention runs ``context_parallel_attention`` on the shards."""

    group: object = None
    mode: str = "ring"
    load_balance: bool = False

    def agree(self, what: str, check, like=None) -> None:
        """Runs ``check()`` (a module's argument checks, returning a description of the call) with every rank of
        the group: a check failing on one rank raises on every rank, and the ranks' descriptions must be equal
        (every rank passes the same full inputs); ValueError otherwise, on every rank. ``like``: the call's data
        (or None), whose device an NCCL group exchanges the record on."""
        world, _ = world_and_rank(self.group)
        described = []

        def record() -> list:
            described.append(check())
            return [zlib.crc32(repr(described[0]).encode())]

        rows = exchange_checked(what, record, 1, self.group, world, like)
        if len({row[0] for row in rows}) > 1:
            raise ValueError(f"{what}: under context parallelism every rank of the group must pass the same full "
                             f"inputs (shapes, dtypes, optional inputs); this rank's call: {described[0]}")

    def shard(self, h: torch.Tensor) -> torch.Tensor:
        return shard_sequence(h, self.group, dim=1, load_balance=self.load_balance)

    def gather(self, h: torch.Tensor) -> torch.Tensor:
        return gather_sequence(h, self.group, dim=1, load_balance=self.load_balance)

    def attention(self, q, k, v, **kw) -> torch.Tensor:
        return context_parallel_attention(q, k, v, group=self.group, mode=self.mode,
                                          load_balance=self.load_balance, **kw)

    def __deepcopy__(self, memo):
        return self  # immutable, and process groups are not copied: a deep copy of a switched model shares it


class ContextParallelHandle:
    """Returned by :func:`context_parallel`: ``remove()`` (or leaving the ``with`` block) restores the
    modules' previous settings."""

    def __init__(self, undo):
        self._undo = list(undo)  # callables, run in reverse order

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _set_config(module: nn.Module, config):
    """Set ``module.context_parallel_config``; returns the function that puts the previous value back."""
    previous = module.__dict__.get("context_parallel_config")
    module.context_parallel_config = config

    def undo():
        if previous is None:
            module.__dict__.pop("context_parallel_config", None)
        else:
            module.context_parallel_config = previous
    return undo


def context_parallel(model: nn.Module, group=None, mode: str = "ring", load_balance: bool = False):
    """Switch ``model`` to context parallelism over ``group``: a ``flowmap_kernels.nn.DiT``, a diffusers DiT
    wrapped in ``flowmap_kernels.integrations.diffusers.DiffusersFlowMap``, or any module containing them;
    a setter that also works as a context manager::

        with context_parallel(model, group, mode="ulysses"):
            v = model(x, s, t, y)           # every rank passes the same full inputs, gets the full output

    Each rank computes the embeddings of the full input, keeps its share of the tokens (``shard_sequence``
    with ``load_balance``) through the blocks, whose attention runs ``context_parallel_attention`` in
    ``mode`` ("ring" or "ulysses"), and gathers them before (DiT) or after (DiffusersFlowMap: the per-token
    output projection) the final layer. Gradients: every rank runs the same loss; the gradient of any
    parameter or input averaged over ``group`` is exact (the convention of data-parallel training whose
    mesh includes the context-parallel ranks; see ``gather_sequence``).

    A DiffusersFlowMap must wrap a ``DiTTransformer2DModel`` whose layers outside attention act per token
    and whose attention processors are plain (``AttnProcessor``, ``AttnProcessor2_0``,
    ``FlowmapAttnProcessor``; they become ``ContextParallelAttnProcessor``); anything else is an error
    naming the module. Everything is checked before anything is changed.
    """
    from ..integrations.diffusers import DiffusersFlowMap, check_context_parallel, enable_context_parallel
    from ..nn import DiT
    from ..nn.layers import Attention

    check_group(group)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    world = dist.get_world_size(group)
    targets = [m for m in model.modules() if isinstance(m, (DiT, Attention))]
    flowmaps = [m for m in model.modules() if isinstance(m, DiffusersFlowMap)]
    if not flowmaps and not any(isinstance(m, DiT) for m in targets):
        raise ValueError("model: contains no flowmap_kernels.nn.DiT and no integrations.diffusers.DiffusersFlowMap "
                         "(the switch shards a DiT's token sequence)")
    if mode == "ulysses":
        for m in targets:
            if isinstance(m, Attention) and m.num_heads % world:
                raise ValueError(f"mode: 'ulysses' needs num_heads ({m.num_heads}) divisible by the group size "
                                 f"({world}); use mode='ring'")
    config = ContextParallelConfig(group, mode, check_load_balance(load_balance))
    switched = [name for name, m in model.named_modules() if m in targets and m.context_parallel_config is not None]
    if switched:
        raise ValueError(f"model: already switched to context parallelism ({switched[0] or 'the model'}); remove "
                         f"the handle context_parallel returned first")
    for fm in flowmaps:
        check_context_parallel(fm, world, mode)
    undo = [_set_config(m, config) for m in targets]
    undo += [enable_context_parallel(fm, config) for fm in flowmaps]
    return ContextParallelHandle(undo)
