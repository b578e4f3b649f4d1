"""shard_sequence / gather_sequence: split a sequence over the ranks of a group and put it back together.

Gradient convention (the one data-parallel training with the context-parallel ranks in its mesh
expects): every rank computes the same loss on the gathered sequence, and gradients are then *averaged*
over the group. ``gather_sequence``'s backward is therefore the adjoint of an all-gather, a
reduce-scatter (sum) of the gradient: rank r receives W times its share, and the average over ranks of
any replicated parameter's gradient is the exact gradient of one copy of the loss.
"""
from __future__ import annotations

import zlib

import torch
import torch.autograd.forward_ad as fwAD

from .comm import (SequenceLayout, all_to_all, check_load_balance, exchange_checked, layout_from_lengths,
                   world_and_rank)


def _check_tensor(name: str, x, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: expected an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, "
                         f"got {dim}")
    return dim % x.dim()


def take_segments(x: torch.Tensor, dim: int, segments) -> torch.Tensor:
    """Concatenation along ``dim`` of the (start, length) pieces of ``x``."""
    parts = [x.narrow(dim, g0, n) for g0, n in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def shard_sequence(x: torch.Tensor, group=None, dim: int = 2, load_balance: bool = False) -> torch.Tensor:
    """This rank's part of ``x`` along ``dim``: chunk r of ``torch.tensor_split(x, W, dim)``, or with
    ``load_balance`` chunks r and 2W-1-r of ``tensor_split(x, 2W, dim)`` concatenated.

    A view-and-concatenate of the full (replicated) tensor, differentiable in every autograd mode; the
    gradient of ``x`` is this rank's part of the gradient, zero elsewhere. No communication.
    """
    dim = _check_tensor("x", x, dim)
    world, rank = world_and_rank(group)
    return take_segments(x, dim, SequenceLayout(x.shape[dim], world, check_load_balance(load_balance)).segments(rank))


def _gather(x: torch.Tensor, dim: int, layout: SequenceLayout, group, kind: str) -> torch.Tensor:
    """All-gather of the ranks' shards along ``dim`` into global order."""
    world, rank = world_and_rank(group)
    shapes = []
    for r in range(world):
        shape = list(x.shape)
        shape[dim] = layout.local_length(r)
        shapes.append(tuple(shape))
    return place_global(all_to_all([x] * world, shapes, x.dtype, group, kind), layout, dim)


def place_global(pieces_by_rank, layout: SequenceLayout, dim: int = 2) -> torch.Tensor:
    """Concatenate the received shards (pieces_by_rank[i] from rank i, in its local order) in global order."""
    placed = []
    for i, piece in enumerate(pieces_by_rank):
        placed += [(g0, piece.narrow(dim, l0, n)) for l0, g0, n in layout.local_pieces(i)]
    if not placed:  # an empty sequence (every shard empty)
        return pieces_by_rank[0]
    placed.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in placed], dim=dim)


def _reduce_scatter(g: torch.Tensor, dim: int, layout: SequenceLayout, group) -> torch.Tensor:
    """Sum over ranks of each rank's full-length ``g``, keeping this rank's segments."""
    world, rank = world_and_rank(group)
    send = [take_segments(g, dim, layout.segments(r)) for r in range(world)]
    recv = all_to_all(send, [send[rank].shape] * world, g.dtype, group, "reduce_scatter")
    return torch.stack(recv).sum(0)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(x, dim, layout, group):
        return _gather(x, dim, layout, group, "all_gather")

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.dim, ctx.layout, ctx.group = inputs

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g.contiguous(), ctx.dim, ctx.layout, ctx.group), None, None, None


def gather_sequence(x_local: torch.Tensor, group=None, dim: int = 2, load_balance: bool = False) -> torch.Tensor:
    """The full tensor on every rank from the shards made by :func:`shard_sequence` (same ``load_balance``).

    Shards may differ in length by the tensor_split rule. Differentiable: the backward is a reduce-scatter
    (sum over ranks) of the gradient, see the module docstring. Under forward-mode AD the tangent is
    gathered the same way (and is itself differentiable).
    """
    world, _ = world_and_rank(group)

    def check() -> list:
        d = _check_tensor("x_local", x_local, dim)
        check_load_balance(load_balance)
        # besides the lengths, what sizes the all-gather's messages: a mismatch would abort the ranks in gloo
        other = tuple(n for i, n in enumerate(x_local.shape) if i != d)
        return [x_local.shape[d], int(load_balance), zlib.crc32(repr((str(x_local.dtype), x_local.dim(), d,
                                                                       other)).encode())]

    rows = exchange_checked("gather_sequence", check, 3, group, world, x_local)
    dim = _check_tensor("x_local", x_local, dim)
    if len({row[1] for row in rows}) > 1:
        raise ValueError(f"load_balance: every rank of the group must call gather_sequence alike; got "
                         f"{', '.join(f'rank {r}: {bool(row[1])}' for r, row in enumerate(rows))}")
    if len({row[2] for row in rows}) > 1:
        raise ValueError(f"x_local: every rank of the group must pass a shard of the same dtype, number of dims and "
                         f"sizes outside dim (only its length along dim={dim} may differ); this rank's: shape "
                         f"{tuple(x_local.shape)}, dtype {x_local.dtype}")
    layout = layout_from_lengths("x_local", [row[0] for row in rows], world, load_balance)
    dual = fwAD.unpack_dual(x_local)
    out = _GatherSequence.apply(dual.primal, dim, layout, group)
    if dual.tangent is None:
        return out
    return fwAD.make_dual(out, _GatherSequence.apply(dual.tangent, dim, layout, group))
