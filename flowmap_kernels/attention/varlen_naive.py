"""Backend "naive" of packed attention: a loop over sequences of the naive math (the reference).

Each sequence runs :mod:`flowmap_kernels.attention.naive` on (1, H, L, D) views of its rows, so every
autograd mode works natively (torch.func.jvp, forward_ad, double backward). A sequence with queries but
no keys gives 0 (its rows are the product of empty (Lq x 0) scores with empty values, which keeps the
output connected to q, k and v with zero derivatives).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autodiff import acc_dtype, zeros_if_none
from . import naive
from .problem import make_problem
from .varlen_problem import VarlenProblem


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """(L, H, D) rows of one sequence -> (1, H, L, D) view."""
    return x.transpose(0, 1).unsqueeze(0)


def tokens_first(x: torch.Tensor) -> torch.Tensor:
    """(1, H, L, D) -> (L, H, D) view."""
    return x[0].transpose(0, 1)


def _sequence_problem(qs, ks, vs, p: VarlenProblem):
    return make_problem(qs, ks, vs, None, 0.0, p.is_causal, p.scale, p.q_heads != p.kv_heads)


def _no_keys(qs, ks, vs, p: VarlenProblem) -> torch.Tensor:
    """(1, Hq, Lq, Dv) zeros from (Lq x 0) scores times (0 x Dv) values."""
    ct = acc_dtype(p.dtype)
    ks, vs = (x.repeat_interleave(p.group, dim=1) for x in (ks, vs))
    return ((qs.to(ct) @ ks.to(ct).transpose(-1, -2)) @ vs.to(ct)).to(p.dtype)


def _pack(pieces, like: torch.Tensor, p: VarlenProblem) -> torch.Tensor:
    if not pieces:
        return like.new_zeros((0, p.q_heads, p.v_head_dim))
    return torch.cat(pieces, dim=0)


def attention(q, k, v, p: VarlenProblem) -> torch.Tensor:
    """O (total_q, Hq, Dv): softmax(scale Q_i K_i^T) V_i for each sequence i, in the input dtype."""
    pieces = []
    for qa, qb, ka, kb in p.segments():
        qs, ks, vs = heads_first(q[qa:qb]), heads_first(k[ka:kb]), heads_first(v[ka:kb])
        if kb == ka:
            o = _no_keys(qs, ks, vs, p)
        else:
            o = naive.attention(qs, ks, vs, _sequence_problem(qs, ks, vs, p))
        pieces.append(tokens_first(o))
    return _pack(pieces, q, p)


def attention_jvp(q, k, v, tq: Optional[torch.Tensor], tk, tv, p: VarlenProblem):
    """(O, tO) per sequence by the closed-form tangent of the naive math, as differentiable plain ops."""
    tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
    outs, touts = [], []
    for qa, qb, ka, kb in p.segments():
        qs, ks, vs = heads_first(q[qa:qb]), heads_first(k[ka:kb]), heads_first(v[ka:kb])
        tqs, tks, tvs = heads_first(tq[qa:qb]), heads_first(tk[ka:kb]), heads_first(tv[ka:kb])
        if kb == ka:
            o = _no_keys(qs, ks, vs, p)
            to = _no_keys(tqs, tks, tvs, p)
        else:
            o, to = naive.attention_jvp(qs, ks, vs, tqs, tks, tvs, _sequence_problem(qs, ks, vs, p))
        outs.append(tokens_first(o))
        touts.append(tokens_first(to))
    return _pack(outs, q, p), _pack(touts, q, p)


def _sequence_ids(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence index, position in the sequence) of each of the ``total`` packed rows."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    seq = torch.searchsorted(cu[1:].contiguous(), rows, right=True)
    return seq, rows - cu[seq]


def block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, p: VarlenProblem) -> torch.Tensor:
    """(total_q, total_k) bool: query row i may attend key row j (same sequence; causal: top-left aligned)."""
    sq, pq = _sequence_ids(cu_q, p.total_q)
    sk, pk = _sequence_ids(cu_k, p.total_k)
    allowed = sq[:, None] == sk[None, :]
    if p.is_causal:
        allowed = allowed & (pk[None, :] <= pq[:, None])
    return allowed


def _dense(q, k, v, cu_q, cu_k, p: VarlenProblem):
    """The packed inputs as one (1, H, total, D) sequence each, and its masked AttentionProblem."""
    qs, ks, vs = heads_first(q), heads_first(k), heads_first(v)
    return qs, ks, vs, make_problem(qs, ks, vs, block_mask(cu_q, cu_k, p), 0.0, False, p.scale,
                                    p.q_heads != p.kv_heads)


def masked_attention(q, k, v, cu_q, cu_k, p: VarlenProblem) -> torch.Tensor:
    """:func:`attention` as one dense attention over all packed rows under the block-diagonal mask: no offset
    is read on the host, so torch.compile traces it whole (O(total_q x total_k) memory)."""
    qs, ks, vs, dp = _dense(q, k, v, cu_q, cu_k, p)
    return tokens_first(naive.attention(qs, ks, vs, dp))


def masked_attention_jvp(q, k, v, tq, tk, tv, cu_q, cu_k, p: VarlenProblem):
    """:func:`attention_jvp` in the dense masked form of :func:`masked_attention`."""
    tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
    qs, ks, vs, dp = _dense(q, k, v, cu_q, cu_k, p)
    o, to = naive.attention_jvp(qs, ks, vs, heads_first(tq), heads_first(tk), heads_first(tv), dp)
    return tokens_first(o), tokens_first(to)
