"""Triton attention kernels: forward, backward, forward+JVP and backward through (O, tO).

Launchers with exactly the signatures of :mod:`flowmap_kernels.attention.blockwise` (the "torch" backend,
which is the exact PyTorch version of every kernel here):

    forward(q, k, v, mask, causal, scale)                     -> o, lse
    backward(q, k, v, o, lse, do, mask, causal, scale)        -> dq, dk, dv
    jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale)     -> o, to, lse, mu
    jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv

and for packed variable-length sequences (flash-attn varlen layout, same kernels with VARLEN):

    varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)                 -> o, lse
    varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale) -> o, to, lse, mu
    varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale)    -> dq, dk, dv
    varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal, scale)
                                                              -> dq, dk, dv, dtq, dtk, dtv

with q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), cu_q / cu_k int32 (batch + 1), o / to
(total_q, Hq, Dv), lse / mu (Hq, total_q) float32.

q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), fp16/bf16/fp32, any strides; query head h reads
key/value head h // (Hq // Hkv) (GQA without copies). ``mask`` is None, bool (True = may attend) or of
the input dtype (added to the logits), broadcastable to (B, Hq, Lq, Lk) and read through its broadcast
strides (stride 0, never expanded in memory). ``causal`` is top-left aligned (row i sees keys j <= i);
tiles entirely above the diagonal are skipped. lse and mu are float32 (B, Hq, Lq); rows with no allowed
key give O = tO = 0, lse = -inf, mu = 0 and zero gradients. Finite additive mask values of any size follow
SDPA: a row masked everywhere by torch.finfo(dtype).min is a uniform softmax (the mean of V), only -inf
(or False) removes a key.

Mathematics (docs/math.md section 1): S = scale Q K^T (+ mask), P = softmax(S), O = P V. The exponent
uses base 2 (logits times scale*log2(e)), except with an additive mask, where the logits stay in natural
units and log2(e) is applied after the max subtraction (finfo.min * log2(e) would overflow); the tangent
logits tS = scale (tQ K^T + Q tK^T) are in natural units. Forward+JVP streams acc += P~V,
tacc += P~ tV + (P~ * (tS - c)) V around the running mean c = r / l of tS (moving tacc by (c_old - c) acc
when c moves), r += rowsum(P~ * tS) (fp32), then O = acc / l, mu = r / l, tO = tacc / l (= (A + B) / l -
mu O without the cancellation). Backwards: key-block-parallel kernels for dK, dV (and dtK, dtV),
query-block-parallel kernels for dQ (and dtQ), a row pre-pass for delta = rowsum(dO * O),
c = rowsum(G * O), e = rowsum(G * tO), and with an additive mask a row-statistics pass (row max and 1 / l
where |lse| is too large for float32 to hold log l next to it); no atomics, deterministic. The primal
backward is compiled with TANGENT=False and pays for no tangent term; dO = None compiles with HAS_DO=False.
Launches run under torch.cuda.device(q.device), with enable_fp_fusion=True pinned, batches split into
launches of at most 65,535 (CUDA's grid limit on axes 1 and 2), and int64 row offsets (LARGE_OFFSETS)
where an operand's in-slice offsets pass 2**31 elements.

Every matrix product is a tl.dot with fp32 accumulation; 16-bit inputs feed the tensor cores with
P (and P * tS, dS, ...) rounded to the input dtype, as in FlashAttention; fp32 inputs use 3xTF32
("tf32x3", about fp32 accuracy) on the GPU. Head dims that are not powers of two are tiled with the next
power of two and masked in registers (no padded copies). Launch configs come from :mod:`.configs`.
"""
from __future__ import annotations

import contextlib
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
def _block_offsets(start, BLOCK: tl.constexpr, LARGE_OFFSETS: tl.constexpr):
    """start + arange(BLOCK): int32, or int64 when LARGE_OFFSETS (a row offset of some operand, index
    times row stride inside one (batch, head) slice, may pass 2**31 elements: see :func:`needs_large_offsets`)."""
    offs = start + tl.arange(0, BLOCK)
    if LARGE_OFFSETS:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _exp_rel(s, ref, MASK_KIND: tl.constexpr):
    """exp(s - ref) for logits in the kernels' units: base 2 (exp2(s - ref)), or natural units with an
    additive mask (MASK_KIND 2), where log2(e) is applied after the subtraction so that finite logits as
    large as the mask's (torch.finfo(dtype).min) never overflow to -inf."""
    if MASK_KIND == 2:
        return tl.exp2((s - ref) * 1.4426950408889634)
    else:
        return tl.exp2(s - ref)


@triton.jit
def _mask_logits(s, rows, cols, n_rows, n_cols, mask_base, sm_r, sm_c,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr):
    """Logits s with -inf where a key is out of range, causal-masked or masked out.

    The tile's rows are queries (cols keys) when ROWS_ARE_QUERIES, else the transpose. MASK_KIND: 0 none,
    1 boolean (nonzero = may attend), 2 additive. s is in base-2 units (scale*log2(e) Q K^T) for kinds 0
    and 1, in natural units (scale Q K^T) for kind 2: the mask is added as it is, with no log2(e) factor
    (finfo.min times log2(e) would overflow to -inf and turn "every key masked by a finite value", a
    uniform softmax in SDPA, into "no key allowed").
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
            s = s + mv.to(tl.float32)
    return tl.where(valid, s, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# forward and forward+JVP
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(
    Q, K, V, TQ, TK, TV, O, TO, LSE, MU, MASK, CU_Q, CU_K,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sob, soh, som, sod, smb, smh, smm, smn,
    H, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr, LARGE_OFFSETS: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); online softmax over key blocks.

    The tangent numerator is accumulated around a running shift c (the running mu = r / l):
    tacc = sum_j P~_j (tV_j + (tS_j - c) V_j), and when c moves to c' the accumulated part is moved by
    (c - c') acc. At the end c = mu, so tO = tacc / l with no cancellation left: the operand P~ (tS - c)
    rounded to 16 bits before its product with V is small where P~ is large, even at logits of 100."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:  # b is a sequence: rows cu_seqlens[b] .. cu_seqlens[b + 1]; row strides sit in the batch strides
        bq = tl.load(CU_Q + b).to(tl.int64)
        bk = tl.load(CU_K + b).to(tl.int64)
        total_q = Lq  # per-row float32 buffers (lse, mu, ...) are (H, total_q)
        Lq = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        Lk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        bq = b
        bk = b
    bh = b * H + h
    hk = h // G
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_n0 = _block_offsets(0, BLOCK_N, LARGE_OFFSETS)
    offs_d = _block_offsets(0, BLOCK_D, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    dt = Q.dtype.element_ty
    if MASK_KIND == 2:
        qk_scale = scale  # natural units (see _mask_logits)
    else:
        qk_scale = scale * 1.4426950408889634

    q = _load_tile(Q + bq * sqb + h * sqh, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
    k_base = K + bk * skb + hk * skh
    v_base = V + bk * svb + hk * svh
    m_base = MASK + b * smb + h * smh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if TANGENT:
        tq = _load_tile(TQ + bq * stqb + h * stqh, offs_m, offs_d, Lq, stqm, stqd, D, BLOCK_D, ALIGN)
        tk_base = TK + bk * stkb + hk * stkh
        tv_base = TV + bk * stvb + hk * stvh
        tacc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)
        shift = tl.zeros([BLOCK_M], tl.float32)

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
        alpha = _exp_rel(m_i, m_safe, MASK_KIND)
        p = _exp_rel(s, m_safe[:, None], MASK_KIND)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
        acc = acc * alpha[:, None]
        if TANGENT:  # before acc takes this block: the shift's move applies to the earlier blocks only
            tk = _load_tile(tk_base, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
            ts = (tl.dot(tq, tl.trans(k), input_precision=PREC)
                  + tl.dot(q, tl.trans(tk), input_precision=PREC)) * scale
            pts = p * ts
            r_i = r_i * alpha + tl.sum(pts, 1)
            shift_new = tl.where(l_i > 0.0, r_i / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
            tacc = tacc * alpha[:, None] + (shift - shift_new)[:, None] * acc
            tacc += tl.dot((pts - p * shift_new[:, None]).to(dt), v, input_precision=PREC)
            tv = _load_tile(tv_base, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
            tacc += tl.dot(p.to(dt), tv, input_precision=PREC)
            shift = shift_new
        acc += tl.dot(p.to(dt), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if MASK_KIND == 2:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe) * 0.6931471805599453)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    if VARLEN:
        row = h * total_q + bq
    else:
        row = bh * Lq
    _store_tile(O + bq * sob + h * soh, o, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN)
    tl.store(LSE + row + offs_m, lse, mask=offs_m < Lq)
    if TANGENT:
        mu = r_i / l_safe
        to = tacc / l_safe[:, None]  # the shift is mu now: (A + B) / l - mu O without the subtraction
        _store_tile(TO + bq * sob + h * soh, to, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN)
        tl.store(MU + row + offs_m, mu, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------------
# backward: row pre-pass
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_prep(
    O, DO, TO, DTO, MU, CONST, CROW, CU_Q,
    sob, soh, som, sod, sdob, sdoh, sdom, sdod, stob, stoh, stom, stod, sgb, sgh, sgm, sgd,
    H, Lq,
    DV: tl.constexpr, HAS_DO: tl.constexpr, TANGENT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr, ALIGN: tl.constexpr, LARGE_OFFSETS: tl.constexpr, VARLEN: tl.constexpr,
):
    """Per query row: CONST = delta + e and CROW = c, with delta = rowsum(dO * O), c = rowsum(G * O),
    e = rowsum(G * tO) (terms of an absent output dropped). The key-block and query-block kernels add the
    -mu c part as (G V^T - c)(tS - mu), which does not cancel at large logits (MU is not read here)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:  # b is a sequence: rows cu_seqlens[b] .. cu_seqlens[b + 1]; row strides sit in the batch strides
        bq = tl.load(CU_Q + b).to(tl.int64)
        total_q = Lq  # per-row float32 buffers (mu, const, c) are (H, total_q)
        Lq = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
    else:
        bq = b
    bh = b * H + h
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    if VARLEN:
        row = h * total_q + bq
    else:
        row = bh * Lq
    o = _load_tile(O + bq * sob + h * soh, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN).to(tl.float32)
    const = tl.zeros([BLOCK_M], tl.float32)
    if HAS_DO:
        do = _load_tile(DO + bq * sdob + h * sdoh, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
        const += tl.sum(do.to(tl.float32) * o, 1)
    if TANGENT:
        g = _load_tile(DTO + bq * sgb + h * sgh, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN).to(tl.float32)
        to = _load_tile(TO + bq * stob + h * stoh, offs_m, offs_dv, Lq, stom, stod, DV, BLOCK_DV, ALIGN)
        c = tl.sum(g * o, 1)
        e = tl.sum(g * to.to(tl.float32), 1)
        const += e
        tl.store(CROW + row + offs_m, c, mask=offs_m < Lq)
    tl.store(CONST + row + offs_m, const, mask=offs_m < Lq)


# ----------------------------------------------------------------------------------------------------
# backward: row statistics for additive masks
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_row_stats(
    Q, K, LSE, ROWMAX, ROWINV, MASK,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, smb, smh, smm, smn,
    H, G, Lq, Lk, scale, lse_limit,
    D: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr,
):
    """Per query row (additive mask, natural-unit logits S): ROWMAX and ROWINV with P = exp(S - ROWMAX) *
    ROWINV. Rows with |lse| <= lse_limit take ROWMAX = lse, ROWINV = 1 (no key loop); fully masked rows
    (lse = -inf) ROWMAX = +inf (P = 0). Rows with a larger |lse| (every key masked by a large finite value,
    e.g. torch.finfo(dtype).min: lse = m + log(l) cannot hold log(l) next to m in float32) recompute the
    row max m and the sum l = sum exp(S - m) over the keys: ROWMAX = m, ROWINV = 1 / l."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    hk = h // G
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_n0 = _block_offsets(0, BLOCK_N, LARGE_OFFSETS)
    offs_d = _block_offsets(0, BLOCK_D, LARGE_OFFSETS)
    in_m = offs_m < Lq
    row = bh * Lq
    lse = tl.load(LSE + row + offs_m, mask=in_m, other=0.0)
    rowmax = tl.where(lse == float("-inf"), float("inf"), lse)
    rowinv = tl.full([BLOCK_M], 1.0, tl.float32)
    recompute = in_m & (tl.abs(lse) > lse_limit) & (lse != float("-inf"))
    if tl.max(recompute.to(tl.int32), 0) > 0:
        q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
        k_base = K + b * skb + hk * skh
        m_base = MASK + b * smb + h * smh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        hi = Lk
        if IS_CAUSAL:
            hi = tl.minimum(Lk, start_m + BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            k = _load_tile(k_base, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = _mask_logits(s, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * _exp_rel(m_i, m_safe, MASK_KIND) + tl.sum(_exp_rel(s, m_safe[:, None], MASK_KIND), 1)
            m_i = m_new
        rowmax = tl.where(recompute, m_i, rowmax)
        rowinv = tl.where(recompute, 1.0 / tl.where(l_i > 0.0, l_i, 1.0), rowinv)
    tl.store(ROWMAX + row + offs_m, rowmax, mask=in_m)
    tl.store(ROWINV + row + offs_m, rowinv, mask=in_m)


# ----------------------------------------------------------------------------------------------------
# backward: key-block-parallel dK, dV (, dtK, dtV)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, TQ, TK, TV, DO, DTO, LSE, LINV, MU, CONST, CROW, MASK, CU_Q, CU_K, DK, DV_, DTK, DTV,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn,
    Hkv, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DTK: tl.constexpr, WANT_DV: tl.constexpr, ALIGN: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, VARLEN: tl.constexpr,
):
    """One program: BLOCK_N keys of one (batch, kv head); loops over its G query heads and the query
    blocks, in transposed tiles (keys x queries). Tangent terms only when TANGENT.

    P = exp(S - lse) from LSE; with an additive mask (MASK_KIND 2) P = exp(S - LSE) * LINV from the row
    statistics of :func:`_attn_row_stats` (LSE then holds a row max, LINV 1 / l).

    WANT_DK / WANT_DTK / WANT_DV select the outputs (dV and dtV go together): one launch with all three,
    or split launches that hold fewer fp32 accumulators and resident tiles in registers at large head
    dims, for a few recomputed products (see :func:`dkdv_parts`).
    """
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:  # b is a sequence: rows cu_seqlens[b] .. cu_seqlens[b + 1]; row strides sit in the batch strides
        bq = tl.load(CU_Q + b).to(tl.int64)
        bk = tl.load(CU_K + b).to(tl.int64)
        total_q = Lq  # per-row float32 buffers (lse, mu, ...) are (H, total_q)
        Lq = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        Lk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        bq = b
        bk = b
    offs_n = _block_offsets(start_n, BLOCK_N, LARGE_OFFSETS)
    offs_m0 = _block_offsets(0, BLOCK_M, LARGE_OFFSETS)
    offs_d = _block_offsets(0, BLOCK_D, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    dt = Q.dtype.element_ty
    if MASK_KIND == 2:
        qk_scale = scale  # natural units (see _mask_logits)
    else:
        qk_scale = scale * 1.4426950408889634

    k = _load_tile(K + bk * skb + hk * skh, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
    if WANT_DK or WANT_DTK:
        v = _load_tile(V + bk * svb + hk * svh, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
    if WANT_DK:
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if WANT_DV:
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if TANGENT:
        if WANT_DK or WANT_DV:
            tk = _load_tile(TK + bk * stkb + hk * stkh, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
        if WANT_DK:
            tv = _load_tile(TV + bk * stvb + hk * stvh, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
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
        if VARLEN:
            row = h * total_q + bq
        else:
            row = (b * H + h) * Lq
        q_base = Q + bq * sqb + h * sqh
        do_base = DO + bq * sdob + h * sdoh
        m_base = MASK + b * smb + h * smh
        if TANGENT:
            tq_base = TQ + bq * stqb + h * stqh
            g_base = DTO + bq * sgb + h * sgh
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            in_m = offs_m < Lq
            q = _load_tile(q_base, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            st = _mask_logits(st, offs_n, offs_m, Lk, Lq, m_base, smn, smm, IS_CAUSAL, MASK_KIND, False)
            if MASK_KIND == 2:  # row max (+inf on fully masked rows: P = 0) and 1 / l
                lse = tl.load(LSE + row + offs_m, mask=in_m, other=float("inf"))
                pt = _exp_rel(st, lse[None, :], MASK_KIND) * tl.load(LINV + row + offs_m, mask=in_m, other=0.0)[None, :]
            else:
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
                    tsmu = (tl.dot(k, tl.trans(tq), input_precision=PREC)
                            + tl.dot(tk, tl.trans(q), input_precision=PREC)) * scale - mu[None, :]
                if WANT_DV:
                    dtv += tl.dot(pt.to(dt), gg, input_precision=PREC)
                    dv += tl.dot((pt * tsmu).to(dt), gg, input_precision=PREC)
                if WANT_DK or WANT_DTK:
                    c = tl.load(CROW + row + offs_m, mask=in_m, other=0.0)
                    gvc = tl.dot(v, tl.trans(gg), input_precision=PREC) - c[None, :]
                    dtst16 = (pt * gvc).to(dt)
                    if WANT_DTK:
                        dtk += tl.dot(dtst16, q, input_precision=PREC)
                    if WANT_DK:
                        dpt += tl.dot(tv, tl.trans(gg), input_precision=PREC) + gvc * tsmu
                        dst = pt * (dpt - const[None, :])
                        dk += tl.dot(dst.to(dt), q, input_precision=PREC) + tl.dot(dtst16, tq, input_precision=PREC)
            elif WANT_DK:
                dst = pt * (dpt - const[None, :])
                dk += tl.dot(dst.to(dt), q, input_precision=PREC)
    if WANT_DK:
        _store_tile(DK + bk * sdkb + hk * sdkh, dk * scale, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_D, ALIGN)
    if WANT_DTK:
        _store_tile(DTK + bk * sdkb + hk * sdkh, dtk * scale, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_D, ALIGN)
    if WANT_DV:
        _store_tile(DV_ + bk * sdvb + hk * sdvh, dv, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_DV, ALIGN)
        if TANGENT:
            _store_tile(DTV + bk * sdvb + hk * sdvh, dtv, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_DV, ALIGN)


# ----------------------------------------------------------------------------------------------------
# backward: query-block-parallel dQ (, dtQ)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_dq(
    Q, K, V, TQ, TK, TV, DO, DTO, LSE, LINV, MU, CONST, CROW, MASK, CU_Q, CU_K, DQ, DTQ, DQP,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgd,
    sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
    H, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    DQ_DS: tl.constexpr, DQ_DTS: tl.constexpr, WANT_DTQ: tl.constexpr, ADD_PARTIAL: tl.constexpr,
    ALIGN: tl.constexpr, LARGE_OFFSETS: tl.constexpr, VARLEN: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, query head); loops over key blocks.

    dQ = scale sum_n (dS K + dtS tK) and dtQ = scale sum_n dtS K. DQ_DS / DQ_DTS select the terms of dQ
    written to DQ, WANT_DTQ writes dtQ; ADD_PARTIAL adds the float32 partial dQ at DQP (written by an
    earlier launch) before the store. One launch does all (see :func:`dq_parts` for the splits, which hold
    fewer resident tiles in registers at large head dims). Without TANGENT only the dS K term exists.
    P as in :func:`_attn_bwd_dkdv` (LSE, or row max and LINV with an additive mask).
    """
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    if VARLEN:  # b is a sequence: rows cu_seqlens[b] .. cu_seqlens[b + 1]; row strides sit in the batch strides
        bq = tl.load(CU_Q + b).to(tl.int64)
        bk = tl.load(CU_K + b).to(tl.int64)
        total_q = Lq  # per-row float32 buffers (lse, mu, ...) are (H, total_q)
        Lq = tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)
        Lk = tl.load(CU_K + b + 1) - tl.load(CU_K + b)
    else:
        bq = b
        bk = b
    bh = b * H + h
    hk = h // G
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_n0 = _block_offsets(0, BLOCK_N, LARGE_OFFSETS)
    offs_d = _block_offsets(0, BLOCK_D, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    in_m = offs_m < Lq
    dt = Q.dtype.element_ty
    if VARLEN:
        row = h * total_q + bq
    else:
        row = bh * Lq

    q = _load_tile(Q + bq * sqb + h * sqh, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
    lse = tl.load(LSE + row + offs_m, mask=in_m, other=float("inf"))
    if MASK_KIND == 2:  # natural units; LSE holds the row max (+inf on fully masked rows), LINV 1 / l
        qk_scale = scale
        linv = tl.load(LINV + row + offs_m, mask=in_m, other=0.0)
    else:
        qk_scale = scale * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    if DQ_DS or DQ_DTS:
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if DQ_DS:
        const = tl.load(CONST + row + offs_m, mask=in_m, other=0.0)
        if HAS_DO:
            do = _load_tile(DO + bq * sdob + h * sdoh, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
    if TANGENT:
        gg = _load_tile(DTO + bq * sgb + h * sgh, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN)
        c = tl.load(CROW + row + offs_m, mask=in_m, other=0.0)
        if DQ_DS:
            tq = _load_tile(TQ + bq * stqb + h * stqh, offs_m, offs_d, Lq, stqm, stqd, D, BLOCK_D, ALIGN)
            mu = tl.load(MU + row + offs_m, mask=in_m, other=0.0)
        if WANT_DTQ:
            dtq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        tk_base = TK + bk * stkb + hk * stkh
        tv_base = TV + bk * stvb + hk * stvh
    k_base = K + bk * skb + hk * skh
    v_base = V + bk * svb + hk * svh
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
        if MASK_KIND == 2:
            p = _exp_rel(s, lse[:, None], MASK_KIND) * linv[:, None]
        else:
            p = tl.exp2(s - lse[:, None])
        if DQ_DS:
            if HAS_DO:
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            else:
                dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if TANGENT:
            gvc = tl.dot(gg, tl.trans(v), input_precision=PREC) - c[:, None]
            dts16 = (p * gvc).to(dt)
            if WANT_DTQ:
                dtq += tl.dot(dts16, k, input_precision=PREC)
            if DQ_DS or DQ_DTS:
                tk = _load_tile(tk_base, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
            if DQ_DS:
                tv = _load_tile(tv_base, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
                ts = (tl.dot(tq, tl.trans(k), input_precision=PREC)
                      + tl.dot(q, tl.trans(tk), input_precision=PREC)) * scale
                dp += tl.dot(gg, tl.trans(tv), input_precision=PREC) + gvc * (ts - mu[:, None])
                dq += tl.dot((p * (dp - const[:, None])).to(dt), k, input_precision=PREC)
            if DQ_DTS:
                dq += tl.dot(dts16, tk, input_precision=PREC)
        else:
            ds = p * (dp - const[:, None])
            dq += tl.dot(ds.to(dt), k, input_precision=PREC)
    if DQ_DS or DQ_DTS:
        dq = dq * scale
        if ADD_PARTIAL:
            dq += _load_tile(DQP + bq * sdqb + h * sdqh, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)
        _store_tile(DQ + bq * sdqb + h * sdqh, dq, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)
    if TANGENT:
        if WANT_DTQ:
            _store_tile(DTQ + bq * sdqb + h * sdqh, dtq * scale, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_D, ALIGN)


# ----------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------
def _strides(x: Optional[torch.Tensor], n: int = 4):
    return tuple(x.stride()) if x is not None else (0,) * n


#: Pinned Triton option (Triton 3.10 changes its default): fused multiply-adds on, the setting every
#: measurement in docs/triton.md was taken with (Triton 3.9's default) and one rounding instead of two.
ENABLE_FP_FUSION = True
#: CUDA's limit on grid axes 1 and 2 (heads, batch); axis 0 (row blocks) allows 2**31 - 1.
MAX_GRID_YZ = 65535
#: Offsets (elements) from which the kernels need int64 row offsets.
INT32_OFFSET_LIMIT = 2 ** 31 - 1
#: |lse| above which the additive-mask backward recomputes a row's max and sum (see _attn_row_stats):
#: float32 lse keeps log(l) to within ulp(|lse|) / 2 <= 1.5e-5 below it.
ROW_STATS_LSE_LIMIT = 256.0

_force_large_offsets: list = []


@contextlib.contextmanager
def large_offsets(enabled: bool = True):
    """Force (or forbid) the int64 row-offset kernels inside the block, whatever the sizes (tests)."""
    _force_large_offsets.append(bool(enabled))
    try:
        yield
    finally:
        _force_large_offsets.pop()


def slice_offset_span(x: torch.Tensor) -> int:
    """Largest element offset inside one (batch, head) slice of a (B, H, L, C) view: the in-kernel
    row/column part of an address, (L - 1) |stride_L| + (C - 1) |stride_C| (0 for an empty slice)."""
    if x.dim() < 2 or x.shape[-1] == 0 or x.shape[-2] == 0:
        return 0
    return sum((n - 1) * abs(s) for n, s in zip(x.shape[-2:], x.stride()[-2:]))


def needs_large_offsets(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether some in-slice offset (row index x row stride + column index x column stride) of these
    (B, H, L, C) operands passes 2**31 - 1 elements, so the kernels must compute it in int64 (the batch
    and head parts are always int64). Forced by :func:`large_offsets`."""
    if _force_large_offsets:
        return _force_large_offsets[-1]
    return any(slice_offset_span(x) > INT32_OFFSET_LIMIT for x in tensors if x is not None)


def batch_chunks(batch: int, heads: int) -> list:
    """[(b0, b1)] batch ranges of at most :data:`MAX_GRID_YZ` (grid axis 2); ValueError when ``heads``
    (grid axis 1) passes the limit."""
    if heads > MAX_GRID_YZ:
        raise ValueError(f"query/key: {heads} heads pass CUDA's grid limit of {MAX_GRID_YZ} on the head axis; "
                         "fold heads into the batch dimension")
    return [(b0, min(batch, b0 + MAX_GRID_YZ)) for b0 in range(0, batch, MAX_GRID_YZ)]


def _device_guard(device: torch.device):
    """torch.cuda.device(device) for a CUDA device (Triton launches on the current device), else a no-op."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def smaller_configs(kwargs: dict, grid_block: str) -> list:
    """Launch options to try, in order, when a launch asks for more shared memory (or registers) than the
    device has: as given; one stage; then the tile halved along the block size that does NOT set the grid
    (``grid_block``: "BLOCK_M" for query-block kernels, "BLOCK_N" for key-block ones), down to 16."""
    tries = [dict(kwargs)]
    cur = dict(kwargs)
    if cur.get("num_stages", 1) > 1:
        cur = dict(cur, num_stages=1)
        tries.append(cur)
    other = "BLOCK_N" if grid_block == "BLOCK_M" else "BLOCK_M"
    while cur.get(other, 16) > 16:
        cur = dict(cur, **{other: cur[other] // 2})
        tries.append(cur)
    return tries


def _launch_one(kernel, grid, args, kwargs: dict, grid_block: str) -> None:
    """kernel[grid](*args, **kwargs), retried with :func:`smaller_configs` when the device's limits are
    hit (Triton's OutOfResources: shared memory or registers of this GPU), so a table entry tuned for a
    larger GPU still runs; if none fits, a RuntimeError names the kernel, the limit and the tiles tried."""
    from triton.runtime.errors import OutOfResources
    tries = smaller_configs(kwargs, grid_block)
    for i, kw in enumerate(tries):
        try:
            kernel[grid](*args, enable_fp_fusion=ENABLE_FP_FUSION, **kw)
            return
        except OutOfResources as e:
            if i + 1 == len(tries):
                name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
                tiles = ", ".join(f"{t.get('BLOCK_M')}x{t.get('BLOCK_N')}/s{t.get('num_stages')}" for t in tries)
                raise RuntimeError(
                    f"flowmap_kernels: {name} needs {e.required} of {e.name} but this GPU allows {e.limit} "
                    f"(tiles tried: {tiles}); run attention on the 'torch' backend "
                    f"(flowmap_kernels.use_backend('torch')) and report the GPU") from e


def _launch(kernel, blocks: int, heads: int, batch: int, args: list, cu_seqlens: tuple = (),
            grid_block: str = "BLOCK_M", **kwargs) -> None:
    """kernel[(blocks, heads, batch)](*args, **kwargs) on the tensors' device, with enable_fp_fusion pinned,
    split into launches of at most MAX_GRID_YZ batch entries, with smaller tiles when the device's limits
    are hit (:func:`_launch_one`; ``grid_block`` names the block size that sets ``blocks``). Dense: every
    tensor argument has the batch first and a chunk passes views [b0:b1], so in-kernel batch offsets stay
    relative to the view. Packed sequences (``cu_seqlens``: the cumulative-offset tensors among ``args``):
    a chunk passes cu[b0:b1 + 1]."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not cu_seqlens and any(a.shape[0] != batch for a in tensors):
        raise ValueError("internal: every tensor argument of a launch must have the batch dimension first")
    with _device_guard(tensors[0].device):
        for b0, b1 in batch_chunks(batch, heads):
            if (b0, b1) == (0, batch):
                chunk = args
            elif cu_seqlens:
                chunk = [a[b0:b1 + 1] if any(a is c for c in cu_seqlens) else a for a in args]
            else:
                chunk = [a[b0:b1] if isinstance(a, torch.Tensor) else a for a in args]
            _launch_one(kernel, (blocks, heads, b1 - b0), chunk, kwargs, grid_block)


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
        self.large_offsets = needs_large_offsets(q, k, v, self.mask if mask is not None else None)
        self.varlen = False  # packed sequences: see _varlen_plan
        self.cu_q = self.cu_k = q  # cumulative offsets (dummies for dense problems)
        self.blocks_q, self.blocks_k = self.Lq, self.Lk  # rows the grid covers per (batch, head)
        self.cu_seqlens = ()

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
        self.large_offsets = self.large_offsets or needs_large_offsets(*tensors)

    def config(self, kernel: str) -> configs.Config:
        return configs.get_config(kernel, self.D, self.esize, self.arch, self.DV)

    def constexprs(self, **extra) -> dict:
        return dict(D=self.D, DV=self.DV, IS_CAUSAL=self.causal, MASK_KIND=self.mask_kind,
                    BLOCK_D=self.block_d, BLOCK_DV=self.block_dv, PREC=_prec(self.dtype), ALIGN=self.align,
                    LARGE_OFFSETS=self.large_offsets, VARLEN=self.varlen, **extra)


def _fwd_args(p: Plan, q, k, v, tq, tk, tv, o, to, lse, mu):
    t = tq is not None
    return [q, k, v, tq if t else q, tk if t else k, tv if t else v, o, to if t else o, lse, mu if t else lse,
            p.mask, p.cu_q, p.cu_k, *q.stride(), *k.stride(), *v.stride(), *_strides(tq), *_strides(tk), *_strides(tv),
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
    if p.Lq > 0 and p.B * p.H > 0:
        _launch(_attn_fwd, triton.cdiv(p.blocks_q, cfg.block_m), p.H, p.B,
                _fwd_args(p, q, k, v, tq, tk, tv, o, to, lse, mu),
                cu_seqlens=p.cu_seqlens,
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
            mu if mu is not None else const, const, crow if crow is not None else const, p.cu_q,
            *o.stride(), *_strides(do), *_strides(to), *_strides(dto), p.H, p.Lq]


def _bwd_args(p: Plan, q, k, v, tq, tk, tv, do, dto, lse, mu, const, crow, outs, linv=None):
    """Arguments of the key-block and query-block kernels up to their strides; ``lse`` is the row max and
    ``linv`` 1 / l (row statistics) with an additive mask."""
    t = tq is not None
    args = [q, k, v, tq if t else q, tk if t else k, tv if t else v, do if do is not None else q,
            dto if dto is not None else q, lse, linv if linv is not None else lse, mu if mu is not None else lse, const,
            crow if crow is not None else const, p.mask, p.cu_q, p.cu_k, *outs,
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


def _run_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale, plan=None):
    p = Plan(q, k, v, mask, causal, scale) if plan is None else plan
    tangent, has_do = dto is not None, do is not None
    prefix = "jvp_backward" if tangent else "backward"
    dev = q.device

    def like(x, dtype=None):  # an output laid out like x: dense (B, H, L, C), or packed rows viewed by _rows4
        dtype = x.dtype if dtype is None else dtype
        if p.varlen:
            return _rows4(torch.empty((x.shape[2], x.shape[1], x.shape[3]), dtype=dtype, device=dev))
        return torch.empty(x.shape, dtype=dtype, device=dev)

    dq, dk, dv = like(q), like(k), like(v)
    dtq, dtk, dtv = (like(q), like(k), like(v)) if tangent else (None, None, None)
    if not (tangent or has_do) or p.B * p.H == 0:
        for x in (dq, dk, dv, dtq, dtk, dtv):
            if x is not None:
                x.zero_()
        return dq, dk, dv, dtq, dtk, dtv
    const = torch.empty((p.H, p.Lq) if p.varlen else (p.B, p.H, p.Lq), dtype=torch.float32, device=dev)
    crow = torch.empty_like(const) if tangent else None
    p.set_align(q, k, v, tq, tk, tv, o, to, do, dto, dq, dk, dv, dtq, dtk, dtv)
    flags = dict(TANGENT=tangent, HAS_DO=has_do)
    pc = configs.PREP_CONFIG
    if p.Lq > 0:
        _launch(_attn_bwd_prep, triton.cdiv(p.blocks_q, pc.block_m), p.H, p.B,
                _prep_args(p, o, do, to if tangent else None, dto, mu if tangent else None, const, crow),
                cu_seqlens=p.cu_seqlens,
                DV=p.DV, BLOCK_M=pc.block_m, BLOCK_DV=p.block_dv, ALIGN=p.align, LARGE_OFFSETS=p.large_offsets,
                VARLEN=p.varlen,
                **flags, num_warps=pc.num_warps, num_stages=pc.num_stages)
    linv = None
    if p.mask_kind == 2 and p.Lq > 0:  # P = exp(S - row max) / l, robust to finfo.min-sized logits
        rowmax, linv = torch.empty_like(const), torch.empty_like(const)
        sc = p.config("forward")
        _launch(_attn_row_stats, triton.cdiv(p.Lq, sc.block_m), p.H, p.B,
                [q, k, lse, rowmax, linv, p.mask, *q.stride(), *k.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk,
                 p.scale, ROW_STATS_LSE_LIMIT],
                D=p.D, IS_CAUSAL=p.causal, MASK_KIND=p.mask_kind, BLOCK_M=sc.block_m, BLOCK_N=sc.block_n,
                BLOCK_D=p.block_d, PREC=_prec(p.dtype), ALIGN=p.align, LARGE_OFFSETS=p.large_offsets,
                num_warps=sc.num_warps, num_stages=sc.num_stages)
        lse = rowmax  # the key-block and query-block kernels read the row max where they read lse
    mu_t = mu if tangent else None
    tq_, tk_, tv_ = (tq, tk, tv) if tangent else (None, None, None)
    cfg = p.config(prefix + "_dkdv")
    if p.Lk > 0:
        for want in dkdv_parts(cfg, tangent):
            _launch(_attn_bwd_dkdv, triton.cdiv(p.blocks_k, cfg.block_n), p.Hkv, p.B,
                    [*_bwd_args(p, q, k, v, tq_, tk_, tv_, do, dto, lse, mu_t, const, crow,
                                [dk, dv, dtk if tangent else dk, dtv if tangent else dv], linv),
                     *dk.stride(), *dv.stride(), *p.mstrides, p.Hkv, p.G, p.Lq, p.Lk, p.scale],
                    cu_seqlens=p.cu_seqlens, grid_block="BLOCK_N",
                    **p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **dict(zip(DKDV_FLAGS, want)), **flags),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        dk.zero_(), dv.zero_()
    cfg = p.config(prefix + "_dq")
    if p.Lq > 0:
        launches = [dict(zip(DQ_FLAGS, want)) for want in dq_parts(cfg, tangent)]
        # split 3: the first launch writes its dQ terms to a float32 partial that the second adds
        partial = like(q, torch.float32) if any(f["ADD_PARTIAL"] for f in launches) else dq
        for f in launches:
            _launch(_attn_bwd_dq, triton.cdiv(p.blocks_q, cfg.block_m), p.H, p.B,
                    [*_bwd_args(p, q, k, v, tq_, tk_, tv_, do, dto, lse, mu_t, const, crow,
                                [dq if f["DQ_DS"] else partial, dtq if tangent else dq, partial], linv),
                     *dq.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale],
                    cu_seqlens=p.cu_seqlens,
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


# ----------------------------------------------------------------------------------------------------
# packed variable-length sequences (flash-attn varlen convention)
# ----------------------------------------------------------------------------------------------------
def _rows4(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(T, H, C) packed rows viewed as (1, H, T, C) with the row stride also in the batch slot: the kernels
    (VARLEN) address sequence b's rows from cu_seqlens[b] * row stride, as a dense batch from b * batch
    stride."""
    if x is None:
        return None
    return x.as_strided((1, x.shape[1], x.shape[0], x.shape[2]), (x.stride(0), x.stride(1), x.stride(0), x.stride(2)),
                        x.storage_offset())


def _packed(x4: torch.Tensor) -> torch.Tensor:
    """The (T, H, C) tensor behind a :func:`_rows4` view."""
    return x4[0].transpose(0, 1)


def _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, tangents=(None, None, None)):
    """Validated (Plan, 4-D views of q, k, v, tq, tk, tv) of a packed problem."""
    for name, x in (("query", q), ("key", k), ("value", v)):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a packed (total, heads, head_dim) tensor, got shape {tuple(x.shape)}")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype != torch.int32 or cu.numel() < 1:
            raise ValueError(f"{name}: expected a 1-D int32 tensor of cumulative offsets (batch + 1 entries)")
        if cu.device != q.device:
            raise ValueError(f"{name}: on {cu.device}, the query on {q.device}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_k: {cu_k.numel()} entries, cu_seqlens_q has {cu_q.numel()}")
    if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"key/value: shapes {tuple(k.shape)}, {tuple(v.shape)} do not match the query "
                         f"{tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query: {q.shape[1]} heads are not a multiple of the {k.shape[1]} key/value heads")
    if int(max_q) < 0 or int(max_k) < 0:
        raise ValueError(f"max_seqlen_q/max_seqlen_k: expected >= 0, got {max_q}, {max_k}")
    views = [_rows4(x) for x in (q, k, v, *tangents)]
    p = Plan(*views[:3], None, causal, scale)
    p.B = cu_q.numel() - 1
    p.varlen = True
    p.cu_q, p.cu_k = cu_q.contiguous(), cu_k.contiguous()
    p.cu_seqlens = (p.cu_q, p.cu_k)
    p.blocks_q, p.blocks_k = int(max_q), int(max_k)
    return p, views


def _run_varlen_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale):
    p, (q4, k4, v4, tq4, tk4, tv4) = _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, (tq, tk, tv))
    tangent = tq is not None
    T, H = q.shape[:2]
    o = torch.empty((T, H, p.DV), dtype=q.dtype, device=q.device)
    to = torch.empty_like(o) if tangent else None
    lse = torch.empty((H, T), dtype=torch.float32, device=q.device)
    mu = torch.empty_like(lse) if tangent else None
    o4, to4 = _rows4(o), _rows4(to)
    p.set_align(q4, k4, v4, tq4, tk4, tv4, o4, to4)
    cfg = p.config("jvp_forward" if tangent else "forward")
    if T > 0 and p.B > 0 and H > 0 and p.blocks_q > 0:
        _launch(_attn_fwd, triton.cdiv(p.blocks_q, cfg.block_m), H, p.B,
                _fwd_args(p, q4, k4, v4, tq4, tk4, tv4, o4, to4, lse, mu), cu_seqlens=p.cu_seqlens,
                **p.constexprs(TANGENT=tangent, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, to, lse, mu


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Packed sequences: q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_q, cu_k int32
    (batch + 1) cumulative offsets (sequence b is rows cu[b]:cu[b + 1]; empty sequences allowed); max_q,
    max_k at least the longest lengths. Causal is top-left aligned per sequence. Returns O (total_q, Hq, Dv)
    in q's dtype and lse (Hq, total_q) float32 (-inf on rows with no key)."""
    o, _, lse, _ = _run_varlen_forward(q, k, v, None, None, None, cu_q, cu_k, max_q, max_k, causal, scale)
    return o, lse


def varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """:func:`varlen_forward` and its JVP: O, tO (total_q, Hq, Dv) and lse, mu (Hq, total_q) float32."""
    return _run_varlen_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale)


def _run_varlen_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal, scale):
    tangent = dto is not None
    p, (q4, k4, v4, tq4, tk4, tv4) = _varlen_plan(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale,
                                                  (tq, tk, tv) if tangent else (None, None, None))
    grads = _run_backward(q4, k4, v4, tq4, tk4, tv4, _rows4(o), _rows4(to) if tangent else None, lse.contiguous(),
                          mu.contiguous() if tangent else None, _rows4(do), _rows4(dto), None, causal, scale, plan=p)
    return tuple(None if x is None else _packed(x) for x in grads)


def varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """dQ, dK, dV of :func:`varlen_forward` (packed layouts as the inputs) from dO (total_q, Hq, Dv)."""
    return _run_varlen_backward(q, k, v, None, None, None, o, None, lse, None, do, None, cu_q, cu_k, max_q, max_k,
                                causal, scale)[:3]


def varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do: Optional[torch.Tensor], dto: Optional[torch.Tensor],
                        cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Gradients for (q, k, v, tq, tk, tv) of :func:`varlen_jvp_forward` from dO (may be None) and dtO (None:
    tangent gradients are None)."""
    if dto is None:
        return (*varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale), None, None, None)
    return _run_varlen_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal, scale)
