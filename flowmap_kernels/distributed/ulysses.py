"""Ulysses context-parallel attention (arXiv:2309.14509): re-shard from sequence to heads and back.

One all-to-all turns every rank's (B, H, L_local, D) shards of q, k, v (and their tangents, packed into the
same message) into (B, H/W, L, D): all tokens, H/W heads, in global token order (load-balanced and
unequal shards included). The local fused attention (``flowmap_kernels.attention`` /
``attention_jvp``) then runs on whole sequences, and a second all-to-all returns (O, tO) to sequence
shards. The all-to-alls are autograd.Functions whose backward is the inverse all-to-all, so the backward
re-shards dO, dtO to heads, runs the fused backward, and re-shards the six gradients to the sequence.
Query heads h*G .. h*G+G-1 use key head h (GQA), so splitting both head counts into W contiguous groups
keeps every query head with its key head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from ..attention import attention, attention_jvp
from .comm import SequenceLayout, all_to_all, world_and_rank
from .sharding import place_global, take_segments


@dataclass(frozen=True)
class UlyssesSpec:
    """The group and one sequence layout per tensor moved in a call (queries and keys may differ)."""

    group: object
    layouts: tuple


def seq_to_heads(xs, layouts, group, kind="all_to_all", split_heads=True):
    """(B, H, L_local, E) shards -> (B, H/W, L, E) in global order, one all-to-all for all ``xs``.

    With ``split_heads=False`` every rank receives all heads (an all-gather of the sequence, for masks
    that broadcast over heads). All ``xs`` share a dtype.
    """
    world, rank = world_and_rank(group)
    dtype = xs[0].dtype
    heads = [x.shape[1] // world if split_heads else x.shape[1] for x in xs]
    send = []
    for j in range(world):
        parts = [(x[:, j * h:(j + 1) * h] if split_heads else x).reshape(-1) for x, h in zip(xs, heads)]
        send.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    recv_shapes, shapes_from = [], []
    for i in range(world):
        shapes = [(x.shape[0], h, lay.local_length(i)) + tuple(x.shape[3:]) for x, h, lay in zip(xs, heads, layouts)]
        shapes_from.append(shapes)
        recv_shapes.append((sum(int(torch.Size(s).numel()) for s in shapes),))
    recv = all_to_all(send, recv_shapes, dtype, group, kind)
    outs = []
    offsets = [0] * world
    for t, (x, lay) in enumerate(zip(xs, layouts)):
        pieces = []
        for i in range(world):
            shape = shapes_from[i][t]
            n = int(torch.Size(shape).numel())
            pieces.append(recv[i][offsets[i]:offsets[i] + n].view(shape))
            offsets[i] += n
        outs.append(place_global(pieces, lay))
    return outs


def heads_to_seq(ys, layouts, group, kind="all_to_all"):
    """Inverse of :func:`seq_to_heads`: (B, H/W, L, E) in global order -> (B, H, L_local, E) shards."""
    world, rank = world_and_rank(group)
    dtype = ys[0].dtype
    send = []
    for j in range(world):
        parts = [take_segments(y, 2, lay.segments(j)).reshape(-1) for y, lay in zip(ys, layouts)]
        send.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    shapes = [(y.shape[0], y.shape[1], lay.local_length(rank)) + tuple(y.shape[3:]) for y, lay in zip(ys, layouts)]
    per_rank = sum(int(torch.Size(s).numel()) for s in shapes)
    recv = all_to_all(send, [(per_rank,)] * world, dtype, group, kind)
    outs = []
    offset = 0
    for shape in shapes:
        n = int(torch.Size(shape).numel())
        outs.append(torch.cat([recv[i][offset:offset + n].view(shape) for i in range(world)], dim=1))
        offset += n
    return outs


class _AllToAll(torch.autograd.Function):
    """Differentiable re-sharding: seq_to_heads (to_heads) or heads_to_seq of the tensors, and the
    other one, its inverse, of the gradients."""

    @staticmethod
    def forward(spec: UlyssesSpec, to_heads: bool, *xs):
        fn = seq_to_heads if to_heads else heads_to_seq
        return tuple(fn(list(xs), spec.layouts, spec.group))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec, ctx.to_heads = inputs[0], inputs[1]
        ctx.inputs_like = [(x.shape, x.dtype, x.device) for x in inputs[2:]]

    @staticmethod
    def backward(ctx, *gs):
        # the inverse re-sharding, itself differentiable: double backward, and forward-over-reverse (gradients
        # that carry tangents move them along, by its jvp rule)
        return (None, None, *_all_to_all(ctx.spec, not ctx.to_heads, *(g.contiguous() for g in gs)))

    @staticmethod
    def jvp(ctx, _spec, _to_heads, *tangents):
        # linear: the tangents move as the tensors do (every rank sends, so absent ones move as zeros)
        tangents = [torch.zeros(shape, dtype=dtype, device=device) if t is None else t.contiguous()
                    for (shape, dtype, device), t in zip(ctx.inputs_like, tangents)]
        fn = seq_to_heads if ctx.to_heads else heads_to_seq
        return tuple(fn(tangents, ctx.spec.layouts, ctx.spec.group))


def _all_to_all(spec: UlyssesSpec, to_heads: bool, *xs):
    """_AllToAll; without grad mode and tangents its forward alone (plain results, as torch's ops give there,
    also inside torch.func.jvp where a Function's outputs would be leaves requiring grad)."""
    if not torch.is_grad_enabled() and all(fwAD.unpack_dual(x).tangent is None for x in xs):
        return tuple(_AllToAll.forward(spec, to_heads, *xs))
    return _AllToAll.apply(spec, to_heads, *xs)


def _seq_to_heads(spec: UlyssesSpec, *xs):
    """Differentiable :func:`seq_to_heads` (backward: :func:`heads_to_seq` of the gradients)."""
    return _all_to_all(spec, True, *xs)


def _heads_to_seq(spec: UlyssesSpec, *ys):
    """Differentiable :func:`heads_to_seq` (backward: :func:`seq_to_heads` of the gradients)."""
    return _all_to_all(spec, False, *ys)


class _GatherRows(torch.autograd.Function):
    """(Bm, 1, L_local, Lk) rows of a mask shared by every head -> all (Bm, 1, L, Lk) rows on every rank; the
    gradient of each rank's rows is the sum of every rank's gradient of them."""

    @staticmethod
    def forward(spec: UlyssesSpec, x):
        return seq_to_heads([x.contiguous()], spec.layouts, spec.group, split_heads=False)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.spec = inputs[0]

    @staticmethod
    def backward(ctx, g):
        parts = heads_to_seq([g.contiguous()], ctx.spec.layouts, ctx.spec.group)[0]  # (Bm, W, L_local, Lk)
        return None, parts.sum(dim=1, keepdim=True)


def mask_to_heads(mask, mask_rows: bool, q_heads: int, q_layout: SequenceLayout, group):
    """This rank's (Bm, Hm or H/W, L or 1, Lk) mask from its (Bm, Hm, L_local or 1, Lk) rows (``mask_rows``: one
    per query row, decided alike on every rank; else one row broadcast over the rows). A float mask
    is moved by differentiable all-to-alls, so that a learned one gets its gradient: that of this rank's rows
    comes back to it (a mask broadcast over the rows gets this rank's heads' share, summing to the whole over
    the ranks)."""
    world, rank = world_and_rank(group)
    per_head = mask.shape[1] == q_heads and q_heads > 1
    if not mask_rows or q_layout.total == 0:
        if per_head:
            h = q_heads // world
            return mask[:, rank * h:(rank + 1) * h]
        return mask
    if mask.is_floating_point():  # (not mask.requires_grad: inside torch.func.jvp a captured tensor reads False)
        spec = UlyssesSpec(group, (q_layout,))
        return _seq_to_heads(spec, mask)[0] if per_head else _GatherRows.apply(spec, mask)
    as_bytes = mask.dtype == torch.bool
    with torch._C._DisableFuncTorch():  # a constant: plain tensors even inside torch.func transforms
        m = mask.to(torch.uint8) if as_bytes else mask
        (out,) = seq_to_heads([m.contiguous()], (q_layout,), group, split_heads=per_head)
        return out.bool() if as_bytes else out


def ulysses_attention(q, k, v, tq, tk, tv, mask, mask_rows, is_causal, scale, enable_gqa, group, q_layout,
                      k_layout):
    """O (tangents None) or (O, tO) on this rank's sequence shards, via head-sharded fused attention."""
    with_tangent = tq is not None
    layouts = (q_layout, k_layout, k_layout)
    xs = (q, k, v) + ((tq, tk, tv) if with_tangent else ())
    spec = UlyssesSpec(group, layouts * (2 if with_tangent else 1))
    hs = _seq_to_heads(spec, *xs)
    mask_h = None if mask is None else mask_to_heads(mask, mask_rows, q.shape[1], q_layout, group)
    kw = dict(attn_mask=mask_h, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    out_spec = UlyssesSpec(group, (q_layout, q_layout))
    if with_tangent:
        o, to = attention_jvp(*hs, **kw)
        return _heads_to_seq(out_spec, o, to)
    o = attention(*hs, **kw)
    return _heads_to_seq(UlyssesSpec(group, (q_layout,)), o)[0]
