"""Backend "torch": exact blockwise attention in PyTorch, memory linear in N.

Scores exist one (query block x key block) tile at a time, as in the FlashAttention kernels; the
formulas are those of docs/math.md section 1. Tensors use an internal 5-d layout that makes grouped-query
attention free of copies: queries (B, Hkv, G, L, D), keys and values (B, Hkv, 1, L, D), with G query
heads per key head. Low precisions are computed tile by tile in float32; results are cast back.
Deterministic: a fixed loop order and no atomics.

Kernel signatures (shared with the Triton backend):
    forward(q, k, v, mask, causal, scale)                     -> o, lse
    backward(q, k, v, o, lse, do, mask, causal, scale)        -> dq, dk, dv
    jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale, tangent_dtype=None) -> o, to, lse, mu
    jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv
and, for every backend (it runs here whichever backend ran the other passes):
    mask_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale) -> dmask
lse and mu are (B, Hq, Lq) in the accumulation dtype (float64 for float64 inputs, else float32); do or dto
may be None (no gradient reaches that output).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autodiff import acc_dtype as _acc_dtype

NEG_INF = float("-inf")
TILE_ELEMENTS = 1 << 21  # scores per tile across batch x heads: 8 MiB in float32
BLOCK_K = 512
#: |lse| above which the backward recomputes a row's max and sum instead of using lse = m + log(l): a row whose
#: keys all carry a huge finite mask value (torch.finfo(dtype).min) has an lse that cannot hold log(l) next to
#: m (P = exp(S - lse) would be 1 instead of 1 / l). Below it float32 keeps log(l) to ulp(256) / 2 = 1.5e-5.
LSE_LIMIT = 256.0


class _Tiles:
    """Views and per-tile logits shared by the four passes."""

    def __init__(self, q, k, mask, causal, scale):
        B, Hq, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        self.B, self.Hq, self.Hkv, self.G, self.Lq, self.Lk = B, Hq, Hkv, Hq // Hkv, Lq, Lk
        self.acc = _acc_dtype(q.dtype)
        self.scale, self.causal, self.device = scale, causal, q.device
        self.mask = None if mask is None else mask.expand(B, Hq, Lq, Lk).unflatten(1, (Hkv, self.G))
        self.mask_is_bool = mask is not None and mask.dtype == torch.bool
        self.block_k = max(16, min(BLOCK_K, Lk))
        bq = TILE_ELEMENTS // max(1, B * Hq * self.block_k)
        self.block_q = max(16, min(1024, 1 << max(bq, 1).bit_length() - 1))

    def q5(self, x):  # (B, Hq, L, D) -> (B, Hkv, G, L, D) view
        return x.unflatten(1, (self.Hkv, self.G))

    def kv5(self, x):  # (B, Hkv, L, D) -> (B, Hkv, 1, L, D) view
        return x.unsqueeze(2)

    def rows(self, x):  # row statistics (B, Hq, L) -> (B, Hkv, G, L, 1)
        return x.unflatten(1, (self.Hkv, self.G)).unsqueeze(-1)

    def q_blocks(self):
        for i0 in range(0, self.Lq, self.block_q):
            yield i0, min(i0 + self.block_q, self.Lq)

    def k_blocks(self, i0, i1):
        for j0 in range(0, self.Lk, self.block_k):
            if self.causal and j0 > i1 - 1:  # tile entirely above the diagonal
                break
            yield j0, min(j0 + self.block_k, self.Lk)

    def logits(self, qb, kb, i0, i1, j0, j1):
        """scale * q k^T (+ float mask), -inf where not allowed: (B, Hkv, G, bq, bk) in acc dtype."""
        s = (qb @ kb.transpose(-1, -2)) * self.scale
        allowed = None
        if self.mask is not None:
            mb = self.mask[..., i0:i1, j0:j1]
            if self.mask_is_bool:
                allowed = mb
            else:
                s = s + mb.to(s.dtype)
        if self.causal and j1 - 1 > i0:
            rows = torch.arange(i0, i1, device=self.device)[:, None]
            cols = torch.arange(j0, j1, device=self.device)[None, :]
            c = rows >= cols
            allowed = c if allowed is None else allowed & c
        if allowed is not None:
            s = s.masked_fill(~allowed, NEG_INF)
        return s

    def tangent_logits(self, qb, kb, tqb, tkb):
        return (tqb @ kb.transpose(-1, -2) + qb @ tkb.transpose(-1, -2)) * self.scale

    def load(self, x, a, b, kind):
        """Slice rows [a, b) of a q-like ('q') or kv-like ('kv') tensor in the acc dtype."""
        view = self.q5(x) if kind == "q" else self.kv5(x)
        return view[..., a:b, :].to(self.acc)


def _safe_max(m):
    return torch.where(m == NEG_INF, torch.zeros_like(m), m)


def _safe_lse(lse):
    """exp(s - lse) must be 0 on fully masked rows (lse = -inf): use +inf there."""
    return torch.where(lse == NEG_INF, torch.full_like(lse, float("inf")), lse)


def _stream(q, k, v, tq, tk, tv, mask, causal, scale, tangent_dtype=None):
    """One pass over key blocks with an online softmax; tangents optional. Returns o, to, lse, mu (to in
    ``tangent_dtype``, default the inputs' dtype)."""
    t = _Tiles(q, k, mask, causal, scale)
    with_tangent = tq is not None
    Dv = v.shape[-1]
    o = torch.empty(q.shape[:-1] + (Dv,), dtype=q.dtype, device=q.device)
    to = torch.empty_like(o, dtype=tangent_dtype or q.dtype) if with_tangent else None
    lse = torch.empty(q.shape[:-1], dtype=t.acc, device=q.device)
    mu = torch.empty_like(lse) if with_tangent else None
    o5, lse5 = t.q5(o), t.q5(lse)
    for i0, i1 in t.q_blocks():
        qb = t.load(q, i0, i1, "q")
        tqb = t.load(tq, i0, i1, "q") if with_tangent else None
        shape = qb.shape[:-1]
        m = torch.full(shape, NEG_INF, dtype=t.acc, device=q.device)
        l = torch.zeros(shape, dtype=t.acc, device=q.device)
        acc = torch.zeros(shape + (Dv,), dtype=t.acc, device=q.device)
        if with_tangent:
            # tacc = sum_j P~_j (tV_j + (tS_j - c) V_j) around the running mean c = r / l of tS, moved by
            # (c - c') acc when c moves to c': at the end c = mu and tO = tacc / l, with no cancellation
            # between two large terms (tS can be large where the softmax is sharp)
            tacc = torch.zeros_like(acc)
            r = torch.zeros_like(l)
            c = torch.zeros_like(l)
        for j0, j1 in t.k_blocks(i0, i1):
            kb, vb = t.load(k, j0, j1, "kv"), t.load(v, j0, j1, "kv")
            s = t.logits(qb, kb, i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = _safe_max(m_new)
            alpha = torch.exp(m - m_safe)
            pt = torch.exp(s - m_safe.unsqueeze(-1))
            l = l * alpha + pt.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1)
            if with_tangent:
                tkb, tvb = t.load(tk, j0, j1, "kv"), t.load(tv, j0, j1, "kv")
                ts = t.tangent_logits(qb, kb, tqb, tkb)
                r = r * alpha + (pt * ts).sum(dim=-1)
                c_new = torch.where(l > 0, r / torch.where(l > 0, l, torch.ones_like(l)), c)
                tacc = (tacc * alpha.unsqueeze(-1) + (c - c_new).unsqueeze(-1) * acc + pt @ tvb
                        + (pt * (ts - c_new.unsqueeze(-1))) @ vb)
                c = c_new
            acc = acc + pt @ vb
            m = m_new
        l_safe = torch.where(l == 0, torch.ones_like(l), l).unsqueeze(-1)
        ob = acc / l_safe
        o5[..., i0:i1, :] = ob.to(o.dtype)
        lse5[..., i0:i1] = m + torch.log(l)
        if with_tangent:
            t.q5(to)[..., i0:i1, :] = (tacc / l_safe).to(to.dtype)
            t.q5(mu)[..., i0:i1] = c
    return o, to, lse, mu


@torch.no_grad()
def forward(q, k, v, mask, causal: bool, scale: float):
    o, _, lse, _ = _stream(q, k, v, None, None, None, mask, causal, scale)
    return o, lse


@torch.no_grad()
def jvp_forward(q, k, v, tq, tk, tv, mask, causal: bool, scale: float, tangent_dtype=None):
    return _stream(q, k, v, tq, tk, tv, mask, causal, scale, tangent_dtype)


def _rowdot(a, b, t: _Tiles):
    return t.rows((a.to(t.acc) * b.to(t.acc)).sum(dim=-1))


@torch.no_grad()
def backward(q, k, v, o, lse, do, mask, causal: bool, scale: float):
    """dQ, dK, dV of the primal: dS = P * (dO V^T - rowsum(dO * O))."""
    return _backward(q, k, v, None, None, None, o, None, lse, None, do, None, mask, causal, scale)[:3]


@torch.no_grad()
def jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                 mask, causal: bool, scale: float):
    """Gradients of (O, tO) for all six inputs (docs/math.md section 1, backward through both outputs)."""
    return _backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)


def _row_max_and_sum(q, k, t: _Tiles):
    """Row max m and sum l = sum exp(S - m) of the logits, (B, Hq, Lq) in the acc dtype (one pass over keys)."""
    m_all = torch.full(q.shape[:-1], NEG_INF, dtype=t.acc, device=q.device)
    l_all = torch.zeros_like(m_all)
    for i0, i1 in t.q_blocks():
        qb = t.load(q, i0, i1, "q")
        m = torch.full(qb.shape[:-1], NEG_INF, dtype=t.acc, device=q.device)
        l = torch.zeros_like(m)
        for j0, j1 in t.k_blocks(i0, i1):
            s = t.logits(qb, t.load(k, j0, j1, "kv"), i0, i1, j0, j1)
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = _safe_max(m_new)
            l = l * torch.exp(m - m_safe) + torch.exp(s - m_safe.unsqueeze(-1)).sum(dim=-1)
            m = m_new
        t.q5(m_all)[..., i0:i1] = m
        t.q5(l_all)[..., i0:i1] = l
    return m_all, l_all


def _row_stats(q, k, lse, t: _Tiles):
    """(rowmax, rowinv) with P = exp(S - rowmax) * rowinv, as (B, Hkv, G, Lq, 1): rowmax = lse and rowinv = 1
    (None) except for rows with |lse| > LSE_LIMIT, whose max and 1 / sum are recomputed."""
    far = (lse.abs() > LSE_LIMIT) & torch.isfinite(lse)
    rowmax = _safe_lse(lse)
    if not bool(far.any()):
        return t.rows(rowmax), None
    m, l = _row_max_and_sum(q, k, t)
    rowmax = torch.where(far, m, rowmax)
    rowinv = torch.where(far, 1.0 / torch.where(l > 0, l, torch.ones_like(l)), torch.ones_like(l))
    return t.rows(rowmax), t.rows(rowinv)


@torch.no_grad()
def mask_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                  mask: torch.Tensor, causal: bool, scale: float):
    """Gradient of a float mask (an additive bias, broadcast to (B, Hq, Lq, Lk)) in the mask's shape and dtype.

    The mask is added to the logits, so its gradient is dS, the gradient of the logits, summed over the dims the
    mask broadcasts along: dS = P * (dO V^T - rowsum(dO * O)) for O, plus the terms of tO (docs/math.md section
    1) when ``dto`` is given (tangent inputs and tO, mu then too). One pass over the tiles; memory: the mask's
    size plus one tile.
    """
    return _backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale, mask_only=True)


class _MaskGrad:
    """Accumulates a tile's logits gradient dS (B, Hkv, G, bq, bk) into the gradient of a float mask, summed over
    the dims along which the mask broadcasts to (B, Hq, Lq, Lk)."""

    def __init__(self, mask: torch.Tensor, t: _Tiles):
        self.mask = mask
        self.shape4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
        self.grad = torch.zeros(self.shape4, dtype=t.acc, device=mask.device)

    def add(self, ds, i0, i1, j0, j1):
        mb, mh, mq, mk = self.shape4
        rows = slice(i0, i1) if mq != 1 else slice(0, 1)
        cols = slice(j0, j1) if mk != 1 else slice(0, 1)
        tile = ds.flatten(1, 2)  # (B, Hq, bq, bk)
        self.grad[..., rows, cols] += tile.sum_to_size(mb, mh, rows.stop - rows.start, cols.stop - cols.start)

    def result(self):
        return self.grad.reshape(self.mask.shape).to(self.mask.dtype)


def _backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale, mask_only=False):
    t = _Tiles(q, k, mask, causal, scale)
    acc = t.acc
    tangent = dto is not None
    primal = do is not None
    if mask_only:
        dmask = _MaskGrad(mask, t)
        if not (primal or tangent):
            return dmask.result()
    else:
        dq, dk, dv = (torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
        dtq, dtk, dtv = ((torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q, k, v))
                         if tangent else (None, None, None))
    lse_s, inv_s = _row_stats(q, k, lse, t)
    delta = _rowdot(do, o, t) if primal else None
    if tangent:
        mu5 = t.rows(mu)
        c, e = _rowdot(dto, o, t), _rowdot(dto, to, t)
        # dS = P * (dP - e - delta), the tangent part of dP taken as (G V^T - c) (tS - mu): both factors vanish
        # where P saturates, so no product of large logits cancels (docs/math.md section 1)
        row_const = e + (delta if primal else 0.0)
    for i0, i1 in t.q_blocks():
        rs = slice(i0, i1)
        qb = t.load(q, i0, i1, "q")
        lb = lse_s[..., rs, :]
        invb = None if inv_s is None else inv_s[..., rs, :]
        dob = t.load(do, i0, i1, "q") if primal else None
        if tangent:
            tqb, gb = t.load(tq, i0, i1, "q"), t.load(dto, i0, i1, "q")
            mub, cb, constb = mu5[..., rs, :], c[..., rs, :], row_const[..., rs, :]
        dq_b = torch.zeros_like(qb)
        dtq_b = torch.zeros_like(qb) if tangent else None
        for j0, j1 in t.k_blocks(i0, i1):
            cs = slice(j0, j1)
            kb, vb = t.load(k, j0, j1, "kv"), t.load(v, j0, j1, "kv")
            p = torch.exp(t.logits(qb, kb, i0, i1, j0, j1) - lb)
            if invb is not None:
                p = p * invb
            dp = dob @ vb.transpose(-1, -2) if primal else 0.0
            if tangent:
                tkb, tvb = t.load(tk, j0, j1, "kv"), t.load(tv, j0, j1, "kv")
                tsmu = t.tangent_logits(qb, kb, tqb, tkb) - mub
                gvc = gb @ vb.transpose(-1, -2) - cb
                dts = p * gvc
                dp = dp + gb @ tvb.transpose(-1, -2) + gvc * tsmu
                ds = p * (dp - constb)
            else:
                ds = p * (dp - delta[..., rs, :])
            if mask_only:
                dmask.add(ds, i0, i1, j0, j1)
                continue
            pT = p.transpose(-1, -2)
            dv_tile = pT @ dob if primal else 0.0
            dq_b += (ds @ kb) * scale
            dsT_q = ds.transpose(-1, -2) @ qb
            if tangent:
                dtv[..., cs, :] += (pT @ gb).sum(dim=2)
                dv_tile = dv_tile + (p * tsmu).transpose(-1, -2) @ gb
                dq_b += (dts @ tkb) * scale
                dtq_b += (dts @ kb) * scale
                dtsT = dts.transpose(-1, -2)
                dsT_q = dsT_q + dtsT @ tqb
                dtk[..., cs, :] += ((dtsT @ qb) * scale).sum(dim=2)
            dk[..., cs, :] += (dsT_q * scale).sum(dim=2)
            if torch.is_tensor(dv_tile):
                dv[..., cs, :] += dv_tile.sum(dim=2)
        if mask_only:
            continue
        t.q5(dq)[..., rs, :] = dq_b
        if tangent:
            t.q5(dtq)[..., rs, :] = dtq_b
    if mask_only:
        return dmask.result()
    cast = lambda x, like: None if x is None else x.to(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), cast(dv, v), cast(dtq, q), cast(dtk, k), cast(dtv, v)
