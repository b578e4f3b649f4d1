"""Triton attention kernels: forward, backward, forward+JVP and backward through (O, tO).

Launchers with exactly the signatures of :mod:`flowmap_kernels.attention.blockwise` (the "torch" backend,
which is the exact PyTorch version of every kernel here):

    forward(q, k, v, mask, causal, scale)                     -> o, lse
    backward(q, k, v, o, lse, do, mask, causal, scale)        -> dq, dk, dv
    jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale)     -> o, to, lse, mu
    jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv

q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), fp16/bf16/fp32, any strides; query head h reads
key/value head h // (Hq // Hkv) (GQA without copies). ``mask`` is None, bool (True = may attend) or of
the input dtype (added to the logits), broadcastable to (B, Hq, Lq, Lk) and read through its broadcast
strides (stride 0, never expanded in memory). ``causal`` is top-left aligned (row i sees keys j <= i);
tiles entirely above the diagonal are skipped. lse and mu are float32 (B, Hq, Lq); rows with no allowed
key give O = tO = 0, lse = -inf, mu = 0 and zero gradients.

Mathematics (REFERENCE.md section 2): S = scale Q K^T (+ mask), P = softmax(S), O = P V. The exponent
uses base 2 (logits times scale*log2(e)); the tangent logits tS = scale (tQ K^T + Q tK^T) are in natural
units. Forward+JVP streams acc += P~V, A + B += P~ tV + (P~ * tS) V, r += rowsum(P~ * tS) (fp32), then
O = acc / l, mu = r / l, tO = (A + B) / l - mu O. Backwards: key-block-parallel kernels for dK, dV (and
dtK, dtV), query-block-parallel kernels for dQ (and dtQ), a row pre-pass for delta = rowsum(dO * O),
c = rowsum(G * O), e = rowsum(G * tO); no atomics, deterministic. The primal backward is compiled with
TANGENT=False and pays for no tangent term; dO = None compiles with HAS_DO=False.

Every matrix product is a tl.dot with fp32 accumulation; 16-bit inputs feed the tensor cores with
P (and P * tS, dS, ...) rounded to the input dtype, as in FlashAttention; fp32 inputs use 3xTF32
("tf32x3", about fp32 accuracy) on the GPU. Head dims that are not powers of two are tiled with the next
power of two and masked in registers (no padded copies). Launch configs come from :mod:`.configs`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, rows, cols, n_rows, s_r, s_c, NCOLS: tl.constexpr, BLOCK_C: tl.constexpr,
               ALIGN: tl.constexpr):
    """Tile base[rows, cols] (zero outside rows < n_rows, cols < NCOLS).

    ALIGN (elements) divides the row stride and the tile base offset: it lets the compiler vectorise
    loads when the row length is not a multiple of 16 (head dim 72: rows of 144 bytes)."""
    if ALIGN > 1:
        s_r = tl.multiple_of(s_r, ALIGN)
        base = tl.multiple_of(base, ALIGN * (base.dtype.element_ty.primitive_bitwidth // 8))
    ptrs = base + rows[:, None] * s_r + cols[None, :] * s_c
    if NCOLS == BLOCK_C:
        x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < NCOLS)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(base, x, rows, cols, n_rows, s_r, s_c, NCOLS: tl.constexpr, BLOCK_C: tl.constexpr,
                ALIGN: tl.constexpr):
    if ALIGN > 1:
        s_r = tl.multiple_of(s_r, ALIGN)
        base = tl.multiple_of(base, ALIGN * (base.dtype.element_ty.primitive_bitwidth // 8))
    ptrs = base + rows[:, None] * s_r + cols[None, :] * s_c
    if NCOLS == BLOCK_C:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < NCOLS)[None, :])


@triton.jit
def _mask_logits(s, rows, cols, n_rows, n_cols, mask_base, sm_r, sm_c,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr):
    """Logits s (base-2 units) with -inf where a key is out of range, causal-masked or masked out.

    The tile's rows are queries (cols keys) when ROWS_ARE_QUERIES, else the transpose. MASK_KIND: 0 none,
    1 boolean (nonzero = may attend), 2 additive (added to the natural-unit logits, so times log2(e)).
    """
    if ROWS_ARE_QUERIES:
        valid = (cols < n_cols)[None, :] & (rows < n_rows)[:, None]
    else:
        valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if IS_CAUSAL:
        if ROWS_ARE_QUERIES:
            valid = valid & (rows[:, None] >= cols[None, :])
        else:
            valid = valid & (cols[None, :] >= rows[:, None])
    if MASK_KIND != 0:
        mv = tl.load(mask_base + rows[:, None] * sm_r + cols[None, :] * sm_c, mask=valid, other=0)
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# forward and forward+JVP
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(
    Q, K, V, TQ, TK, TV, O, TO, LSE, MU, MASK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sob, soh, som, sod, smb, smh, smm, smn,
    H, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); online softmax over key blocks."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dt = Q.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if TANGENT:
        tq = _load_tile(TQ + b * stqb + h * stqh, offs_m, offs_d, Lq, stqm, stqd, D, BLOCK_D, ALIGN)
        tk_base = TK + b * stkb + hk * stkh
        tv_base = TV + b * stvb + hk * stvh
        tacc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)  # key blocks entirely above the diagonal are skipped
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _mask_logits(s, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PREC)
        if TANGENT:
            tk = _load_tile(tk_base, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
            ts = (tl.dot(tq, tl.trans(k), input_precision=PREC)
                  + tl.dot(q, tl.trans(tk), input_precision=PREC)) * scale
            pts = p * ts
            r_i = r_i * alpha + tl.sum(pts, 1)
            tv = _load_tile(tv_base, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
            tacc = tacc * alpha[:, None] + tl.dot(p.to(dt), tv, input_precision=PREC)
            tacc += tl.dot(pts.to(dt), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row = bh * Lq
    _store_tile(O + b * sob + h * soh, o, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN)
    tl.store(LSE + row + offs_m, lse, mask=offs_m < Lq)
    if TANGENT:
        mu = r_i / l_safe
        to = tacc / l_safe[:, None] - mu[:, None] * o
        _store_tile(TO + b * sob + h * soh, to, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN)
        tl.store(MU + row + offs_m, mu, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------------
# backward: row pre-pass
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_prep(
    O, DO, TO, DTO, MU, CONST, CROW,
    sob, soh, som, sod, sdob, sdoh, sdom, sdod, stob, stoh, stom, stod, sgb, sgh, sgm, sgd,
    H, Lq,
    DV: tl.constexpr, HAS_DO: tl.constexpr, TANGENT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr,
):
    """Per query row: CONST = delta + (e - mu c) and CROW = c, with delta = rowsum(dO * O),
    c = rowsum(G * O), e = rowsum(G * tO) (terms of an absent output dropped)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row = bh * Lq
    o = _load_tile(O + b * sob + h * soh, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN).to(tl.float32)
    const = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DO:
        do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
        const += tl.sum(do.to(tl.float32) * o, 1)
    if TANGENT:
        g = _load_tile(DTO + b * sgb + h * sgh, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN).to(tl.float32)
        to = _load_tile(TO + b * stob + h * stoh, offs_m, offs_dv, Lq, stom, stod, DV, BLOCK_DV, ALIGN)
        mu = tl.load(MU + row + offs_m, mask=offs_m < Lq, other=0.0)
        c = tl.sum(g * o, 1)
        e = tl.sum(g * to.to(tl.float32), 1)
        const += e - mu * c
        tl.store(CROW + row + offs_m, c, mask=offs_m < Lq)
    tl.store(CONST + row + offs_m, const, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------------
# backward: key-block-parallel dK, dV (, dtK, dtV)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, TQ, TK, TV, DO, DTO, LSE, MU, CONST, CROW, MASK, DK, DV_, DTK, DTV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn,
    Hkv, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DTK: tl.constexpr, WANT_DV: tl.constexpr, ALIGN: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, kv head); loops over its G query heads and the query
    blocks, in transposed tiles (keys x queries). Tangent terms only when TANGENT.

    WANT_DK / WANT_DTK / WANT_DV select the outputs (dV and dtV go together): one launch with all three,
    or split launches that hold fewer fp32 accumulators and resident tiles in registers at large head
    dims, for a few recomputed products (see :func:`dkdv_parts`).
    """
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dt = Q.dtype.element_ty
    qk_scale = scale * 1.4426950408889634

    k = _load_tile(K + b * skb + hk * skh, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
    if WANT_DK or WANT_DTK:
        v = _load_tile(V + b * svb + hk * svh, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
    if WANT_DK:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if WANT_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if TANGENT:
        if WANT_DK or WANT_DV:
            tk = _load_tile(TK + b * stkb + hk * stkh, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
        if WANT_DK:
            tv = _load_tile(TV + b * stvb + hk * stvh, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
        if WANT_DTK:
            dtk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        if WANT_DV:
            dtv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # query blocks entirely above the diagonal are skipped
    H = Hkv * G
    for g in range(0, G):
        h = hk * G + g
        row = (b * H + h) * Lq
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        m_base = MASK + b * smb + h * smh
        if TANGENT:
            tq_base = TQ + b * stqb + h * stqh
            g_base = DTO + b * sgb + h * sgh
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            in_m = offs_m < Lq
            q = _load_tile(q_base, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            st = _mask_logits(st, offs_n, offs_m, Lk, Lq, m_base, smn, smm, IS_CAUSAL, MASK_KIND, False)
            lse = tl.load(LSE + row + offs_m, mask=in_m, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)  # fully masked row: P = 0
            pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
            if WANT_DK:
                const = tl.load(CONST + row + offs_m, mask=in_m, other=0.0)
            if HAS_DO:
                if WANT_DK or WANT_DV:
                    do = _load_tile(do_base, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
                if WANT_DV:
                    dv += tl.dot(pt.to(dt), do, input_precision=PREC)
                if WANT_DK:
                    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            elif WANT_DK:
                dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            if TANGENT:
                gg = _load_tile(g_base, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN)
                if WANT_DK or WANT_DV:
                    tq = _load_tile(tq_base, offs_m, offs_d, Lq, stqm, stqd, D, BLOCK_D, ALIGN)
                    mu = tl.load(MU + row + offs_m, mask=in_m, other=0.0)
                    tst = (tl.dot(k, tl.trans(tq), input_precision=PREC)
                           + tl.dot(tk, tl.trans(q), input_precision=PREC)) * scale
                    tsmu = tst - mu[None, :]
                if WANT_DV:
                    dtv += tl.dot(pt.to(dt), gg, input_precision=PREC)
                    dv += tl.dot((pt * tsmu).to(dt), gg, input_precision=PREC)
                if WANT_DK or WANT_DTK:
                    c = tl.load(CROW + row + offs_m, mask=in_m, other=0.0)
                    gvt = tl.dot(v, tl.trans(gg), input_precision=PREC)
                    dtst16 = (pt * (gvt - c[None, :])).to(dt)
                    if WANT_DTK:
                        dtk += tl.dot(dtst16, q, input_precision=PREC)
                    if WANT_DK:
                        dpt += tl.dot(tv, tl.trans(gg), input_precision=PREC) + gvt * tsmu - c[None, :] * tst
                        dst = pt * (dpt - const[None, :])
                        dk += tl.dot(dst.to(dt), q, input_precision=PREC) + tl.dot(dtst16, tq, input_precision=PREC)
            elif WANT_DK:
                dst = pt * (dpt - const[None, :])
                dk += tl.dot(dst.to(dt), q, input_precision=PREC)
    if WANT_DK:
        _store_tile(DK + b * sdkb + hk * sdkh, dk * scale, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_D, ALIGN)
    if WANT_DTK:
        _store_tile(DTK + b * sdkb + hk * sdkh, dtk * scale, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_D, ALIGN)
    if WANT_DV:
        _store_tile(DV_ + b * sdvb + hk * sdvh, dv, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_DV, ALIGN)
        if TANGENT:
            _store_tile(DTV + b * sdvb + hk * sdvh, dtv, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_DV, ALIGN)


# ----------------------------------------------------------------------------------------------------
# backward: query-block-parallel dQ (, dtQ)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq(
    Q, K, V, TQ, TK, TV, DO, DTO, LSE, MU, CONST, CROW, MASK, DQ, DTQ, DQP,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgd,
    sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
    H, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    DQ_DS: tl.constexpr, DQ_DTS: tl.constexpr, WANT_DTQ: tl.constexpr, ADD_PARTIAL: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); loops over key blocks.

    dQ = scale sum_n (dS K + dtS tK) and dtQ = scale sum_n dtS K. DQ_DS / DQ_DTS select the terms of dQ
    written to DQ, WANT_DTQ writes dtQ; ADD_PARTIAL adds the float32 partial dQ at DQP (written by an
    earlier launch) before the store. One launch does all (see :func:`dq_parts` for the splits, which hold
    fewer resident tiles in registers at large head dims). Without TANGENT only the dS K term exists.
    """
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    hk = h // G
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    in_m = offs_m < Lq
    dt = Q.dtype.element_ty
    qk_scale = scale * 1.4426950408889634
    row = bh * Lq

    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
    lse = tl.load(LSE + row + offs_m, mask=in_m, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    if DQ_DS or DQ_DTS:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DQ_DS:
        const = tl.load(CONST + row + offs_m, mask=in_m, other=0.0)
        if HAS_DO:
            do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
    if TANGENT:
        gg = _load_tile(DTO + b * sgb + h * sgh, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN)
        c = tl.load(CROW + row + offs_m, mask=in_m, other=0.0)
        if DQ_DS:
            tq = _load_tile(TQ + b * stqb + h * stqh, offs_m, offs_d, Lq, stqm, stqd, D, BLOCK_D, ALIGN)
            mu = tl.load(MU + row + offs_m, mask=in_m, other=0.0)
        if WANT_DTQ:
            dtq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tk_base = TK + b * stkb + hk * stkh
        tv_base = TV + b * stvb + hk * stvh
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_base = MASK + b * smb + h * smh
    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
        v = _load_tile(v_base, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _mask_logits(s, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True)
        p = tl.exp2(s - lse[:, None])
        if DQ_DS:
            if HAS_DO:
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            else:
                dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if TANGENT:
            gv = tl.dot(gg, tl.trans(v), input_precision=PREC)
            dts16 = (p * (gv - c[:, None])).to(dt)
            if WANT_DTQ:
                dtq += tl.dot(dts16, k, input_precision=PREC)
            if DQ_DS or DQ_DTS:
                tk = _load_tile(tk_base, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
            if DQ_DS:
                tv = _load_tile(tv_base, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
                ts = (tl.dot(tq, tl.trans(k), input_precision=PREC)
                      + tl.dot(q, tl.trans(tk), input_precision=PREC)) * scale
                dp += tl.dot(gg, tl.trans(tv), input_precision=PREC) + gv * (ts - mu[:, None]) - c[:, None] * ts
                dq += tl.dot((p * (dp - const[:, None])).to(dt), k, input_precision=PREC)
            if DQ_DTS:
                dq += tl.dot(dts16, tk, input_precision=PREC)
        else:
            ds = p * (dp - const[:, None])
            dq += tl.dot(ds.to(dt), k, input_precision=PREC)
    if DQ_DS or DQ_DTS:
        dq = dq * scale
        if ADD_PARTIAL:
            dq += _load_tile(DQP + b * sdqb + h * sdqh, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)
        _store_tile(DQ + b * sdqb + h * sdqh, dq, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)
    if TANGENT:
        if WANT_DTQ:
            _store_tile(DTQ + b * sdqb + h * sdqh, dtq * scale, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)


KERNEL_FUNCTIONS = {
    "forward": _attn_fwd, "jvp_forward": _attn_fwd,
    "backward_prep": _attn_bwd_prep, "jvp_backward_prep": _attn_bwd_prep,
    "backward_dkdv": _attn_bwd_dkdv, "jvp_backward_dkdv": _attn_bwd_dkdv,
    "backward_dq": _attn_bwd_dq, "jvp_backward_dq": _attn_bwd_dq,
}


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _strides(x: Optional[torch.Tensor], n: int = 4):
    return tuple(x.stride()) if x is not None else (0,) * n


def _prec(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _mask_args(mask, q, k):
    """(tensor, strides, kind) with the mask viewed with broadcast (stride 0) dims, never copied."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    B, Hq, Lq = q.shape[:3]
    Lk = k.shape[2]
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(B, Hq, Lq, Lk)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), tuple(m.stride()), 1
    return m, tuple(m.stride()), 2


def _check(q, k, v):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query: the Triton kernels take float16, bfloat16 or float32, got {q.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"query/value: head dim {max(q.shape[-1], v.shape[-1])} > 256 is not supported")


class Plan:
    """Sizes and constexprs of one call, shared by the launchers and the compile report."""

    def __init__(self, q, k, v, mask, causal, scale):
        _check(q, k, v)
        self.B, self.H, self.Lq, self.D = q.shape
        self.Hkv, self.Lk, self.DV = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.H // self.Hkv
        self.mask, self.mstrides, self.mask_kind = _mask_args(mask, q, k)
        self.causal = bool(causal)
        self.scale = float(scale)
        self.dtype = q.dtype
        self.esize = q.element_size()
        self.arch = configs.current_arch(q.device) if q.device.type == "cuda" or configs.interpreting() \
            else "sm90"
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.block_dv = max(16, triton.next_power_of_2(self.DV))
        self.align = 1

    def set_align(self, *tensors) -> None:
        """ALIGN: the largest power of two <= 16 dividing every row/head/batch stride and every data
        offset (in elements) of the dense operands; 1 unless each has a unit last-dim stride."""
        g = 16
        for x in tensors:
            if x is None:
                continue
            if x.stride(-1) != 1 and x.shape[-1] > 1:
                self.align = 1
                return
            for st in x.stride()[:-1]:
                g = math.gcd(g, st)
            g = math.gcd(g, x.data_ptr() // x.element_size() if x.data_ptr() % x.element_size() == 0 else 1)
        self.align = 1 << (g.bit_length() - 1) if g > 0 else 16

    def config(self, kernel: str) -> configs.Config:
        return configs.get_config(kernel, self.D, self.esize, self.arch, self.DV)

    def constexprs(self, **extra) -> dict:
        return dict(D=self.D, DV=self.DV, IS_CAUSAL=self.causal, MASK_KIND=self.mask_kind,
                    BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PREC=_prec(self.dtype), ALIGN=self.align, **extra)


def _fwd_args(p: Plan, q, k, v, tq, tk, tv, o, to, lse, mu):
    t = tq is not None
    return [q, k, v, tq if t else q, tk if t else k, tv if t else v, o, to if t else o, lse, mu if t else lse,
            p.mask, *q.stride(), *k.stride(), *v.stride(), *_strides(tq), *_strides(tk), *_strides(tv),
            *o.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale]


def _run_forward(q, k, v, tq, tk, tv, mask, causal, scale):
    p = Plan(q, k, v, mask, causal, scale)
    tangent = tq is not None
    o = torch.empty((p.B, p.H, p.Lq, p.DV), dtype=q.dtype, device=q.device)
    to = torch.empty_like(o) if tangent else None
    lse = torch.empty((p.B, p.H, p.Lq), dtype=torch.float32, device=q.device)
    mu = torch.empty_like(lse) if tangent else None
    p.set_align(q, k, v, tq, tk, tv, o, to)
    name = "jvp_forward" if tangent else "forward"
    cfg = p.config(name)
    grid = (triton.cdiv(p.Lq, cfg.block_m), p.H, p.B)
    if p.Lq > 0 and p.B * p.H > 0:
        _attn_fwd[grid](*_fwd_args(p, q, k, v, tq, tk, tv, o, to, lse, mu),
                        **p.constexprs(TANGENT=tangent, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, to, lse, mu


def forward(q, k, v, mask, causal: bool, scale: float):
    """O (B, Hq, Lq, Dv) in q's dtype and the row log-sum-exp (B, Hq, Lq) float32."""
    o, _, lse, _ = _run_forward(q, k, v, None, None, None, mask, causal, scale)
    return o, lse


def jvp_forward(q, k, v, tq, tk, tv, mask, causal: bool, scale: float):
    """O, tO (B, Hq, Lq, Dv) and lse, mu (B, Hq, Lq) float32 in one pass over the keys."""
    return _run_forward(q, k, v, tq, tk, tv, mask, causal, scale)


def _prep_args(p: Plan, o, do, to, dto, mu, const, crow):
    return [o, do if do is not None else o, to if to is not None else o, dto if dto is not None else o,
            mu if mu is not None else const, const, crow if crow is not None else const,
            *o.stride(), *_strides(do), *_strides(to), *_strides(dto), p.H, p.Lq]


def _bwd_args(p: Plan, q, k, v, tq, tk, tv, do, dto, lse, mu, const, crow, outs):
    t = tq is not None
    args = [q, k, v, tq if t else q, tk if t else k, tv if t else v, do if do is not None else q,
            dto if dto is not None else q, lse, mu if mu is not None else lse, const,
            crow if crow is not None else const, p.mask, *outs,
            *q.stride(), *k.stride(), *v.stride(), *_strides(tq), *_strides(tk), *_strides(tv),
            *_strides(do), *_strides(dto)]
    return args


#: (WANT_DK, WANT_DTK, WANT_DV) of the key-block kernel's launches, by the config's ``split``
DKDV_FLAGS = ("WANT_DK", "WANT_DTK", "WANT_DV")
DKDV_PARTS = {0: ((True, True, True),), 2: ((True, True, False), (False, False, True)),
              3: ((True, False, False), (False, True, False), (False, False, True))}
DKDV_SUFFIX = {(True, True, True): "", (True, True, False): "[dk,dtk]", (False, False, True): "[dv,dtv]",
               (True, False, False): "[dk]", (False, True, False): "[dtk]"}


def dkdv_parts(cfg: configs.Config, tangent: bool = True) -> tuple:
    """(WANT_DK, WANT_DTK, WANT_DV) of each key-block launch: one fused launch, or the config's split
    (2: dK+dtK | dV+dtV; 3: dK | dtK | dV+dtV) for the tangent backward. The primal never splits."""
    if not tangent:
        return ((True, False, True),)
    return DKDV_PARTS[int(cfg.split)]


#: (DQ_DS, DQ_DTS, WANT_DTQ, ADD_PARTIAL) of the query-block kernel's launches, by the config's ``split``
DQ_FLAGS = ("DQ_DS", "DQ_DTS", "WANT_DTQ", "ADD_PARTIAL")
DQ_PARTS = {0: ((True, True, True, False),), 2: ((True, True, False, False), (False, False, True, False)),
            3: ((False, True, True, False), (True, False, False, True))}
DQ_SUFFIX = {(True, True, True, False): "", (True, True, False, False): "[dq]", (False, False, True, False): "[dtq]",
             (False, True, True, False): "[dtq,dq_dts]", (True, False, False, True): "[dq_ds]",
             (True, False, False, False): ""}  # the primal backward


def dq_parts(cfg: configs.Config, tangent: bool = True) -> tuple:
    """(DQ_DS, DQ_DTS, WANT_DTQ, ADD_PARTIAL) of each query-block launch: one fused launch, or the config's
    split for the tangent backward (2: dQ | dtQ; 3: dtQ with dQ's dtS tK term into a float32 partial |
    dQ's dS K term plus that partial). The primal never splits."""
    if not tangent:
        return ((True, False, False, False),)
    return DQ_PARTS[int(cfg.split)]


def _run_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale):
    p = Plan(q, k, v, mask, causal, scale)
    tangent, has_do = dto is not None, do is not None
    prefix = "jvp_backward" if tangent else "backward"
    dev = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    dtq, dtk, dtv = ((torch.empty_like(dq), torch.empty_like(dk), torch.empty_like(dv)) if tangent
                     else (None, None, None))
    if not (tangent or has_do) or p.B * p.H == 0:
        for x in (dq, dk, dv, dtq, dtk, dtv):
            if x is not None:
                x.zero_()
        return dq, dk, dv, dtq, dtk, dtv
    const = torch.empty((p.B, p.H, p.Lq), dtype=torch.float32, device=dev)
    crow = torch.empty_like(const) if tangent else None
    p.set_align(q, k, v, tq, tk, tv, o, to, do, dto, dq, dk, dv, dtq, dtk, dtv)
    flags = dict(TANGENT=tangent, HAS_DO=has_do)
    pc = configs.PREP_CONFIG
    if p.Lq > 0:
        _attn_bwd_prep[(triton.cdiv(p.Lq, pc.block_m), p.H, p.B)](
            *_prep_args(p, o, do, to if tangent else None, dto, mu if tangent else None, const, crow),
            DV=p.DV, BLOCK_M=pc.block_m, BLOCK_DV=p.block_dv, ALIGN=p.align, **flags,
            num_warps=pc.num_warps, num_stages=pc.num_stages)
    mu_t = mu if tangent else None
    tq_, tk_, tv_ = (tq, tk, tv) if tangent else (None, None, None)
    cfg = p.config(prefix + "_dkdv")
    if p.Lk > 0:
        for want in dkdv_parts(cfg, tangent):
            _attn_bwd_dkdv[(triton.cdiv(p.Lk, cfg.block_n), p.Hkv, p.B)](
                *_bwd_args(p, q, k, v, tq_, tk_, tv_, do, dto, lse, mu_t, const, crow,
                           [dk, dv, dtk if tangent else dk, dtv if tangent else dv]),
                *dk.stride(), *dv.stride(), *p.mstrides, p.Hkv, p.G, p.Lq, p.Lk, p.scale,
                **p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **dict(zip(DKDV_FLAGS, want)), **flags),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        dk.zero_(), dv.zero_()
    cfg = p.config(prefix + "_dq")
    if p.Lq > 0:
        launches = [dict(zip(DQ_FLAGS, want)) for want in dq_parts(cfg, tangent)]
        # split 3: the first launch writes its dQ terms to a float32 partial that the second adds
        partial = (torch.empty(q.shape, dtype=torch.float32, device=dev)
                   if any(f["ADD_PARTIAL"] for f in launches) else dq)
        for f in launches:
            _attn_bwd_dq[(triton.cdiv(p.Lq, cfg.block_m), p.H, p.B)](
                *_bwd_args(p, q, k, v, tq_, tk_, tv_, do, dto, lse, mu_t, const, crow,
                           [dq if f["DQ_DS"] else partial, dtq if tangent else dq, partial]),
                *dq.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale,
                **p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **f, **flags),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv, dtq, dtk, dtv


def backward(q, k, v, o, lse, do, mask, causal: bool, scale: float):
    """dQ, dK, dV of the primal (no tangent terms compiled in)."""
    return _run_backward(q, k, v, None, None, None, o, None, lse, None, do, None, mask, causal, scale)[:3]


def jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                 mask, causal: bool, scale: float):
    """Gradients for (q, k, v, tq, tk, tv) from dO (may be None) and dtO (None: tangent grads are None)."""
    if dto is None:
        dq, dk, dv, *_ = _run_backward(q, k, v, None, None, None, o, None, lse, None, do, None, mask, causal, scale)
        return dq, dk, dv, None, None, None
    return _run_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)
