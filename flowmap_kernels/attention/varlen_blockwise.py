"""Backend "torch" of packed attention: the blockwise kernels run sequence by sequence.

Each sequence's rows are viewed as (1, H, L, D) and handed to :mod:`flowmap_kernels.attention.blockwise`
(exact, one score tile at a time), so memory is linear in the packed length and no padding is computed.
Sequences without queries are skipped; sequences with queries but no keys give O = tO = 0,
lse = -inf, mu = 0 and zero gradients.

Kernel signatures (shared with the Triton backend):
    varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)            -> o, lse
    varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale)
                                                                                -> o, to, lse, mu
    varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale) -> dq, dk, dv
    varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal,
                        scale)                                                  -> dq, dk, dv, dtq, dtk, dtv
q, tq (total_q, Hq, D); k, tk (total_k, Hkv, D); v, tv (total_k, Hkv, Dv); cu_q, cu_k int32 (B + 1,);
lse and mu (Hq, total_q) in the accumulation dtype (float64 for float64 inputs, else float32); do may be
None (no gradient reaches O).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autodiff import acc_dtype as _acc_dtype
from . import blockwise
from .varlen_naive import heads_first, tokens_first

NEG_INF = float("-inf")


def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """(q_start, q_end, k_start, k_end) of each sequence that has queries and keys."""
    qo, ko = cu_q.tolist(), cu_k.tolist()
    return [(qo[i], qo[i + 1], ko[i], ko[i + 1]) for i in range(len(qo) - 1)
            if qo[i + 1] > qo[i] and ko[i + 1] > ko[i]]


def _rows(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Row statistics (Hq, total_q) -> (1, Hq, b - a) view of one sequence."""
    return x[:, a:b].unsqueeze(0)


def _outputs(q, v, with_tangent: bool):
    total_q, Hq, _ = q.shape
    o = q.new_zeros((total_q, Hq, v.shape[-1]))
    lse = torch.full((Hq, total_q), NEG_INF, dtype=_acc_dtype(q.dtype), device=q.device)
    if not with_tangent:
        return o, None, lse, None
    return o, torch.zeros_like(o), lse, torch.zeros_like(lse)


@torch.no_grad()
def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """O (total_q, Hq, Dv) and row log-sum-exp (Hq, total_q) of each sequence's attention."""
    o, _, lse, _ = _outputs(q, v, False)
    for qa, qb, ka, kb in _segments(cu_q, cu_k):
        os_, lses = blockwise.forward(heads_first(q[qa:qb]), heads_first(k[ka:kb]), heads_first(v[ka:kb]),
                                      None, causal, scale)
        o[qa:qb] = tokens_first(os_)
        lse[:, qa:qb] = lses[0]
    return o, lse


@torch.no_grad()
def varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """O, tO (total_q, Hq, Dv), lse and mu = rowsum(P * tS) (Hq, total_q)."""
    o, to, lse, mu = _outputs(q, v, True)
    for qa, qb, ka, kb in _segments(cu_q, cu_k):
        os_, tos, lses, mus = blockwise.jvp_forward(
            heads_first(q[qa:qb]), heads_first(k[ka:kb]), heads_first(v[ka:kb]),
            heads_first(tq[qa:qb]), heads_first(tk[ka:kb]), heads_first(tv[ka:kb]), None, causal, scale)
        o[qa:qb], to[qa:qb] = tokens_first(os_), tokens_first(tos)
        lse[:, qa:qb], mu[:, qa:qb] = lses[0], mus[0]
    return o, to, lse, mu


@torch.no_grad()
def varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """dQ, dK, dV of the primal from dO (total_q, Hq, Dv)."""
    dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    for qa, qb, ka, kb in _segments(cu_q, cu_k):
        grads = blockwise.backward(heads_first(q[qa:qb]), heads_first(k[ka:kb]), heads_first(v[ka:kb]),
                                   heads_first(o[qa:qb]), _rows(lse, qa, qb), heads_first(do[qa:qb]),
                                   None, causal, scale)
        dq[qa:qb], dk[ka:kb], dv[ka:kb] = (tokens_first(g) for g in grads)
    return dq, dk, dv


@torch.no_grad()
def varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: torch.Tensor,
                        cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Gradients of (O, tO) for q, k, v, tq, tk, tv from dO (optional) and dtO."""
    outs = [torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v, tq, tk, tv)]
    for qa, qb, ka, kb in _segments(cu_q, cu_k):
        sq, sk = slice(qa, qb), slice(ka, kb)
        grads = blockwise.jvp_backward(
            heads_first(q[sq]), heads_first(k[sk]), heads_first(v[sk]),
            heads_first(tq[sq]), heads_first(tk[sk]), heads_first(tv[sk]),
            heads_first(o[sq]), heads_first(to[sq]), _rows(lse, qa, qb), _rows(mu, qa, qb),
            None if do is None else heads_first(do[sq]), heads_first(dto[sq]), None, causal, scale)
        for out, g, rows in zip(outs, grads, (sq, sk, sk, sq, sk, sk)):
            out[rows] = tokens_first(g)
    return tuple(outs)
