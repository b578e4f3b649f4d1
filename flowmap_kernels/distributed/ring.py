"""Ring context-parallel attention: K/V blocks travel around the ring, partial results are merged exactly.

Each rank keeps its query rows and, over W steps, sees every rank's key/value block (and their tangents):
at step s it holds the block of rank (r - s) mod W while the next block is already in flight. Per block
the package's fused kernels give partial results over those keys only, (O_j, tO_j, lse_j, mu_j), which
merge exactly (arXiv:2310.01889 for the primal; the tangent terms follow from differentiating the weights):

    lse = logsumexp_j lse_j,  w_j = exp(lse_j - lse),  O = sum_j w_j O_j,  mu = sum_j w_j mu_j,
    tO = sum_j w_j (tO_j + (mu_j - mu) O_j)          (d w_j = w_j (mu_j - mu) along the tangent)

The merge is associative, so it runs online, one block at a time. The backward calls the backward kernels
with the *merged* O, tO, lse, mu: their row scalars (rowsum(dO * O), rowsum(dtO * O), rowsum(dtO * tO),
mu) are global, so each call returns exactly that key block's share of dQ, dtQ and the block's own
dK, dV, dtK, dtV. Those accumulators travel around the ring with the blocks and reach their owner after
W hops.

Causal attention (top-left aligned, in global positions) is decided per (query piece, key piece) pair:
keys all after the last query: skipped; keys all at or before the first query: no mask; same start:
the kernels' ``causal`` flag; otherwise a boolean mask built from the global offsets. With load balancing
each rank holds two pieces (chunks r and 2W-1-r), so every rank does the same amount of work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .._autodiff import acc_dtype, record_dual_level, refuse_forward_over_reverse
from ..attention import kernels
from .comm import RingExchange, SequenceLayout

NEG_INF = float("-inf")


@dataclass(frozen=True)
class RingSpec:
    """Everything about a ring call except the tensors. ``mask_rows`` / ``mask_cols``: whether the mask's
    query-row / key-column dims are full (else they broadcast, size 1)."""

    group: object
    world: int
    rank: int
    q_layout: SequenceLayout
    k_layout: SequenceLayout
    causal: bool
    scale: float
    backend: str
    mask_rows: bool = False
    mask_cols: bool = False


def _block_pairs(spec: RingSpec, src: int, mask: Optional[torch.Tensor], device):
    """(query slice, key slice, causal flag, mask, mask index) for every visible (query piece, key piece) pair
    between this rank's queries and the key block of rank ``src``; the mask of a pair is ``mask[mask index]``
    (both None without a user mask)."""
    for ql0, qg0, qn in spec.q_layout.local_pieces(spec.rank):
        for kl0, kg0, kn in spec.k_layout.local_pieces(src):
            qs, ks = slice(ql0, ql0 + qn), slice(kl0, kl0 + kn)
            if spec.causal:
                if kg0 > qg0 + qn - 1:
                    continue  # every key after every query: invisible
                if kg0 + kn - 1 <= qg0:
                    yield qs, ks, False, None, None  # every key at or before every query: fully visible
                elif kg0 == qg0:
                    yield qs, ks, True, None, None  # aligned diagonal block: the kernels' own causal flag
                else:
                    rows = torch.arange(qg0, qg0 + qn, device=device)[:, None]
                    cols = torch.arange(kg0, kg0 + kn, device=device)[None, :]
                    yield qs, ks, False, (rows >= cols)[None, None], None
                continue
            if mask is None:
                yield qs, ks, False, None, None
            else:
                index = _mask_index(spec, ql0, qn, kg0, kn)
                yield qs, ks, False, mask[index], index


def _mask_index(spec: RingSpec, ql0: int, qn: int, kg0: int, kn: int):
    """The index of the (local query rows, global key columns) piece in the 4-d mask (its broadcast dims whole)."""
    rows = slice(ql0, ql0 + qn) if spec.mask_rows else slice(None)
    cols = slice(kg0, kg0 + kn) if spec.mask_cols else slice(None)
    return slice(None), slice(None), rows, cols


def _rows(x, s):
    return x[:, :, s].contiguous()


def _merge(state, part, with_tangent):
    """Online merge of two partial results over disjoint key sets (see the module docstring)."""
    if state is None:
        return part
    o_a, to_a, lse_a, mu_a = state
    o_b, to_b, lse_b, mu_b = part
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(lse == NEG_INF, torch.zeros_like(lse), lse)  # rows with no key at all: weights 0
    w_a, w_b = torch.exp(lse_a - safe), torch.exp(lse_b - safe)
    o = w_a[..., None] * o_a + w_b[..., None] * o_b
    if not with_tangent:
        return o, None, lse, None
    mu = w_a * mu_a + w_b * mu_b
    to = (w_a[..., None] * (to_a + (mu_a - mu)[..., None] * o_a)
          + w_b[..., None] * (to_b + (mu_b - mu)[..., None] * o_b))
    return o, to, lse, mu


def _shape_with_len(x, n):
    return x.shape[:2] + (n,) + x.shape[3:]


def ring_forward(q, k, v, tq, tk, tv, mask, spec: RingSpec):
    """(O, tO, lse, mu) over all keys of the group; tangents None -> primal only (tO, mu None)."""
    with_tangent = tq is not None
    acc = acc_dtype(q.dtype)
    B, Hq, Lq = q.shape[:3]
    Dv = v.shape[-1]
    o = torch.zeros(B, Hq, Lq, Dv, dtype=acc, device=q.device)
    lse = torch.full((B, Hq, Lq), NEG_INF, dtype=acc, device=q.device)
    to = torch.zeros_like(o) if with_tangent else None
    mu = torch.zeros_like(lse) if with_tangent else None
    states = {}
    block = [k, v] + ([tk, tv] if with_tangent else [])
    W, r = spec.world, spec.rank
    q_rows = {(l0, l0 + n): (_rows(q, slice(l0, l0 + n)), _rows(tq, slice(l0, l0 + n)) if with_tangent else None)
              for l0, _, n in spec.q_layout.local_pieces(r)}  # sliced once, used at every step
    for step in range(W):
        src = (r - step) % W
        exchange = None
        if step < W - 1:
            n_next = spec.k_layout.local_length((r - step - 1) % W)
            exchange = RingExchange(block, [_shape_with_len(x, n_next) for x in block], spec.group, "ring", tag=0)
        for qs, ks, causal, bmask, _ in _block_pairs(spec, src, mask, q.device):
            kb, vb = _rows(block[0], ks), _rows(block[1], ks)
            qb, tqb = q_rows[(qs.start, qs.stop)]
            if with_tangent:
                part = kernels.attention_jvp_forward(qb, kb, vb, tqb, _rows(block[2], ks), _rows(block[3], ks), bmask,
                                                     causal, spec.scale, spec.backend)
                part = (part[0].to(acc), part[1].to(acc), part[2], part[3])
            else:
                po, plse = kernels.attention_forward(qb, kb, vb, bmask, causal, spec.scale, spec.backend)
                part = (po.to(acc), None, plse, None)
            key = (qs.start, qs.stop)
            states[key] = _merge(states.get(key), part, with_tangent)
        if exchange is not None:
            block = exchange.wait()
    for (a, b), (so, sto, slse, smu) in states.items():
        o[:, :, a:b], lse[:, :, a:b] = so, slse
        if with_tangent:
            to[:, :, a:b], mu[:, :, a:b] = sto, smu
    return o.to(q.dtype), (to.to(q.dtype) if with_tangent else None), lse, mu


def ring_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, spec: RingSpec, mask_grad: bool = False):
    """Gradients for (q, k, v[, tq, tk, tv]) from dO (may be None) and dtO (None: primal backward), and of
    the float mask when ``mask_grad`` (else None): (dq, dk, dv, dtq, dtk, dtv, dmask).

    At step s this rank adds its queries' share to the accumulators of block r - s, which arrived from rank
    r - 1 while step s - 1 was computing, and sends them on to rank r + 1 without waiting; after W steps
    the accumulators of its own block come home. The mask holds this rank's query rows against every key,
    so its gradient stays here: each (query piece, key block) pair adds its logits gradient (one blockwise
    pass, ``kernels.attention_mask_backward``, with the merged row statistics) to the pair's piece of it.
    """
    tangent = dto is not None
    acc = acc_dtype(q.dtype)
    W, r = spec.world, spec.rank
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dtq = torch.zeros_like(dq) if tangent else None
    block = [k, v] + ([tk, tv] if tangent else [])
    # the query-side operands of each query piece, sliced once
    rows = {}
    for l0, _, n in spec.q_layout.local_pieces(r):  # the pieces _block_pairs slices queries by
        qs = slice(l0, l0 + n)
        rows[(qs.start, qs.stop)] = dict(
            q=_rows(q, qs), o=_rows(o, qs), lse=lse[:, :, qs].contiguous(),
            do=None if do is None else _rows(do, qs),
            tq=_rows(tq, qs) if tangent else None, to=_rows(to, qs) if tangent else None,
            mu=mu[:, :, qs].contiguous() if tangent else None, dto=_rows(dto, qs) if tangent else None)
    incoming = None  # exchange delivering the accumulators of the block processed next
    grads = None
    dmask = torch.zeros(mask.shape, dtype=acc_dtype(mask.dtype), device=mask.device) if mask_grad else None
    for step in range(W):
        src = (r - step) % W
        exchange = None
        n_next = spec.k_layout.local_length((r - step - 1) % W)
        if step < W - 1:
            exchange = RingExchange(block, [_shape_with_len(x, n_next) for x in block], spec.group, "ring", tag=0)
        contrib = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in block]
        for qs, ks, causal, bmask, mindex in _block_pairs(spec, src, mask, q.device):
            qr = rows[(qs.start, qs.stop)]
            kb, vb = _rows(block[0], ks), _rows(block[1], ks)
            if mask_grad and mindex is not None:
                tkb, tvb = (_rows(block[2], ks), _rows(block[3], ks)) if tangent else (None, None)
                g = kernels.attention_mask_backward(qr["q"], kb, vb, qr["tq"], tkb, tvb, qr["o"], qr["to"], qr["lse"],
                                                    qr["mu"], qr["do"], qr["dto"], bmask, causal, spec.scale)
                dmask[mindex] += g
            if tangent:
                gs = kernels.attention_jvp_backward(qr["q"], kb, vb, qr["tq"], _rows(block[2], ks),
                                                    _rows(block[3], ks), qr["o"], qr["to"], qr["lse"], qr["mu"],
                                                    qr["do"], qr["dto"], bmask, causal, spec.scale, spec.backend)
                dq[:, :, qs] += gs[0]
                dtq[:, :, qs] += gs[3]
                for acc_grad, g in zip(contrib, (gs[1], gs[2], gs[4], gs[5])):
                    acc_grad[:, :, ks] += g
            else:
                gq, gk, gv = kernels.attention_backward(qr["q"], kb, vb, qr["o"], qr["lse"], qr["do"], bmask, causal,
                                                        spec.scale, spec.backend)
                dq[:, :, qs] += gq
                contrib[0][:, :, ks] += gk
                contrib[1][:, :, ks] += gv
        if incoming is not None:  # accumulated by ranks r - step .. r - 1
            contrib = [a + b for a, b in zip(incoming.wait(), contrib)]
        if W > 1:  # on with the block; the last hop returns them to their owner
            incoming = RingExchange(contrib, [_shape_with_len(x, n_next) for x in contrib], spec.group,
                                    "ring_grad", tag=1)
        else:
            grads = contrib
        if exchange is not None:
            block = exchange.wait()
    if incoming is not None:
        grads = incoming.wait()
    dk, dv = grads[0].to(k.dtype), grads[1].to(v.dtype)
    dmask = None if dmask is None else dmask.to(mask.dtype)
    if not tangent:
        return dq.to(q.dtype), dk, dv, None, None, None, dmask
    return dq.to(q.dtype), dk, dv, dtq.to(q.dtype), grads[2].to(k.dtype), grads[3].to(v.dtype), dmask


@once_differentiable
def _ring_jvp_backward(ctx, do, dto):
    q, k, v, tq, tk, tv, mask, o, to, lse, mu = ctx.saved_tensors
    if do is None and dto is None:
        return (None,) * 8
    *grads, dmask = ring_backward(q, k, v, tq, tk, tv, o, to if dto is not None else None, lse,
                                  mu if dto is not None else None, do, dto, mask, ctx.spec,
                                  mask_grad=ctx.needs_input_grad[6])
    return (*grads, dmask, None)


class RingAttentionJVPFunction(torch.autograd.Function):
    """(O, tO, lse, mu) of ring attention; backward through (O, tO) by the ring backward (first order)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, spec: RingSpec):
        return ring_forward(q, k, v, tq, tk, tv, mask, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, mask, spec = inputs
        o, to, lse, mu = output
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, tq, tk, tv, mask, o, to, lse, mu)
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)
        record_dual_level(ctx)

    @staticmethod
    def backward(ctx, do, dto, _dlse, _dmu):
        refuse_forward_over_reverse(
            ctx, "context_parallel_attention: mode='ring' has no forward-over-reverse derivative (a graph built with "
                 "create_graph=True inside the forward_ad level of the call, e.g. a Hessian-vector product); "
                 "mode='ulysses' has one")
        return _ring_jvp_backward(ctx, do, dto)

    @staticmethod
    def jvp(ctx, *_tangents):
        raise NotImplementedError(
            "context_parallel_attention: mode='ring' has no forward-mode derivative of (O, tO) (forward-over-forward, "
            "e.g. nested torch.func.jvp); mode='ulysses' has one, and reverse mode through the tangent works in "
            "both modes (torch.autograd.grad / torch.func.grad over one jvp)")


class RingAttentionFunction(torch.autograd.Function):
    """(O, lse) of ring attention with the primal kernels; backward by the primal ring backward. Its
    forward-mode rule runs :class:`RingAttentionJVPFunction` (a fallback: ``context_parallel_attention``
    calls that directly when its inputs carry tangents)."""

    @staticmethod
    def forward(q, k, v, mask, spec: RingSpec):
        o, _, lse, _ = ring_forward(q, k, v, None, None, None, mask, spec)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, spec = inputs
        o, lse = output
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.save_for_forward(q, k, v, mask)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, do, _dlse):
        q, k, v, mask, o, lse = ctx.saved_tensors
        if do is None:
            return (None,) * 5
        grads = ring_backward(q, k, v, None, None, None, o, None, lse, None, do, None, mask, ctx.spec,
                              mask_grad=ctx.needs_input_grad[3])
        return (*grads[:3], grads[6], None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, tmask, _tspec):
        if tmask is not None:
            raise ValueError("attn_mask: forward-mode tangents of the mask are not supported")
        q, k, v, mask = ctx.saved_tensors
        tq, tk, tv = (torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), (tq, tk, tv)))
        _, to, _, _ = RingAttentionJVPFunction.apply(q, k, v, tq, tk, tv, mask, ctx.spec)
        return to, None
