"""Triton attention kernels (@triton.jit only): forward, backward, forward+JVP and backward through (O, tO).

The launches of these kernels (grids, arguments, constexprs, configs) are described once in :mod:`.launch`,
which also holds the launchers (``forward``, ``backward``, ``jvp_forward``, ``jvp_backward`` and their
``varlen_*`` versions); the tiles come from :mod:`.configs`.

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
mu O without the cancellation). Backwards: a row pre-pass for delta = rowsum(dO * O),
c = rowsum(G * O), e = rowsum(G * tO), with an additive mask a row-statistics pass (row max and 1 / l
where |lse| is too large for float32 to hold log l next to it), then either one key-block-parallel pass
for dK, dV (and dtK, dtV) that also adds dQ (and dtQ) to float32 buffers with atomics (S, P and tS
computed once per tile: the default), or, under torch.use_deterministic_algorithms(True), that pass
without dQ followed by a query-block-parallel pass for dQ (and dtQ): no atomics, bitwise repeatable. The primal
backward is compiled with TANGENT=False and pays for no tangent term; dO = None compiles with HAS_DO=False.
Launches run under torch.cuda.device(q.device), with enable_fp_fusion=True pinned, batches split into
launches of at most 65,535 (CUDA's grid limit on axes 1 and 2), and int64 row offsets (LARGE_OFFSETS)
where an operand's in-slice offsets pass 2**31 elements.

Every matrix product is a tl.dot with fp32 accumulation; 16-bit inputs feed the tensor cores with
P (and P * tS, dS, ...) rounded to the input dtype, as in FlashAttention; fp32 inputs use 3xTF32
("tf32x3", about fp32 accuracy) on the GPU. Head dims that are not powers of two are tiled with the next
power of two and masked in registers (no padded copies).
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def _store_rows(base, x, start, rows, cols, n_rows, s_r, s_c, NCOLS: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr, ALIGN: tl.constexpr, TMA: tl.constexpr):
    """base[start:start + BLOCK_R, :NCOLS] = x (rows < n_rows): a tensor-descriptor store when TMA (the rows
    past n_rows are dropped), else :func:`_store_tile` (rows = start + arange(BLOCK_R))."""
    if TMA:
        desc = tl.make_tensor_descriptor(base, [n_rows, NCOLS], [s_r, 1], [BLOCK_R, BLOCK_C])
        desc.store([start, 0], x.to(base.dtype.element_ty))
    else:
        _store_tile(base, x, rows, cols, n_rows, s_r, s_c, NCOLS, BLOCK_C, ALIGN)


@triton.jit
def _atomic_add_tile(base, x, rows, cols, n_rows, s_r, s_c, NCOLS: tl.constexpr, BLOCK_C: tl.constexpr):
    """base[rows, cols] += x (float32 atomics, relaxed: only the sum is read, after the launch)."""
    ptrs = base + rows[:, None] * s_r + cols[None, :] * s_c
    if NCOLS == BLOCK_C:
        tl.atomic_add(ptrs, x, mask=(rows < n_rows)[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=(rows < n_rows)[:, None] & (cols < NCOLS)[None, :], sem="relaxed")


@triton.jit
def _atomic_add_rows(base, x, start, rows, cols, n_rows, s_r, s_c, NCOLS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr, TMA: tl.constexpr):
    """base[start:start + BLOCK_R, :NCOLS] += x (float32, rows < n_rows; rows = start + arange(BLOCK_R)): a
    tensor-descriptor reduction when TMA (cp.reduce.async.bulk.tensor: no pointer or mask tensors in registers,
    rows past n_rows dropped), else :func:`_atomic_add_tile`."""
    if TMA:
        desc = tl.make_tensor_descriptor(base, [n_rows, NCOLS], [s_r, 1], [BLOCK_R, BLOCK_C])
        desc.atomic_add([start, 0], x)
    else:
        _atomic_add_tile(base, x, rows, cols, n_rows, s_r, s_c, NCOLS, BLOCK_C)


@triton.jit
def _block_offsets(start, BLOCK: tl.constexpr, LARGE_OFFSETS: tl.constexpr):
    """start + arange(BLOCK): int32, or int64 when LARGE_OFFSETS (a row offset of some operand, index
    times row stride inside one (batch, head) slice, may pass 2**31 elements: see
    :func:`.launch.needs_large_offsets`)."""
    offs = start + tl.arange(0, BLOCK)
    if LARGE_OFFSETS:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _sequence(b, CU, L, VARLEN: tl.constexpr):
    """(first row, rows) of batch entry b's sequence. Dense: (b, L), the rows addressed through the batch
    stride. Packed sequences (VARLEN): rows CU[b] .. CU[b + 1] of the packed operand, whose row stride the
    launcher puts in the batch stride slot too (launch._rows4)."""
    if VARLEN:
        start = tl.load(CU + b).to(tl.int64)
        L = tl.load(CU + b + 1) - tl.load(CU + b)
    else:
        start = b
    return start, L


@triton.jit
def _row_offset(b, h, H, bq, Lq, total_q, VARLEN: tl.constexpr):
    """Offset of the first row of (batch entry b, query head h) in the float32 per-row buffers (lse, mu,
    ...): (B, H, Lq) dense; (H, total_q) packed, the sequence starting at row bq."""
    if VARLEN:
        row = h * total_q + bq
    else:
        row = (b * H + h) * Lq
    return row


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
def _mask_logits(s, start_r, start_c, rows, cols, n_rows, n_cols, mask_base, sm_r, sm_c,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr,
                 SKIP_INTERIOR: tl.constexpr):
    """Logits s with -inf where a key is out of range, causal-masked or masked out.

    The tile's rows are queries (cols keys) when ROWS_ARE_QUERIES, else the transpose; rows = start_r +
    arange, cols = start_c + arange. MASK_KIND: 0 none, 1 boolean (nonzero = may attend), 2 additive. s is
    in base-2 units (scale*log2(e) Q K^T) for kinds 0 and 1, in natural units (scale Q K^T) for kind 2:
    the mask is added as it is, with no log2(e) factor (finfo.min times log2(e) would overflow to -inf and
    turn "every key masked by a finite value", a uniform softmax in SDPA, into "no key allowed").
    SKIP_INTERIOR: without a mask, an interior tile (every row and column in range, and with IS_CAUSAL every
    key at or before every query) skips the mask arithmetic, which only the edge tiles of a loop compute.
    The launcher sets it on the wgmma / tcgen05 families (launch.Plan.skip_interior): on the mma.sync ones
    the branch costs the forward+JVP registers and shared memory (more spill at D = 64 and 128).
    """
    if MASK_KIND == 0 and SKIP_INTERIOR:
        edge = (start_r + s.shape[0] > n_rows) | (start_c + s.shape[1] > n_cols)
        if IS_CAUSAL:
            if ROWS_ARE_QUERIES:
                edge = edge | (start_c + s.shape[1] - 1 > start_r)
            else:
                edge = edge | (start_r + s.shape[0] - 1 > start_c)
        if edge:
            s = tl.where(_valid_logits(rows, cols, n_rows, n_cols, IS_CAUSAL, ROWS_ARE_QUERIES), s, float("-inf"))
    elif MASK_KIND == 0:
        s = tl.where(_valid_logits(rows, cols, n_rows, n_cols, IS_CAUSAL, ROWS_ARE_QUERIES), s, float("-inf"))
    else:
        valid = _valid_logits(rows, cols, n_rows, n_cols, IS_CAUSAL, ROWS_ARE_QUERIES)
        mv = tl.load(mask_base + rows[:, None] * sm_r + cols[None, :] * sm_c, mask=valid, other=0)
        if MASK_KIND == 1:
            valid = valid & (mv != 0)
        else:
            s = s + mv.to(tl.float32)
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _valid_logits(rows, cols, n_rows, n_cols, IS_CAUSAL: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr):
    """The entries of a tile (rows x cols) in range and, with IS_CAUSAL, with the key at or before the query."""
    valid = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    if IS_CAUSAL:
        if ROWS_ARE_QUERIES:
            valid = valid & (rows[:, None] >= cols[None, :])
        else:
            valid = valid & (cols[None, :] >= rows[:, None])
    return valid


# ----------------------------------------------------------------------------------------------------
# forward and forward+JVP
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _dot_split(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for a float32 tile ``a`` and a 16-bit tile ``b``: a = hi + lo, both in b's dtype, two
    products (a keeps 16 (bfloat16) or 22 (float16) significant bits instead of 8 or 11), chained into
    ``acc`` (acc + (hi b + lo b) would hold a second float32 accumulator)."""
    hi = a.to(b.dtype)
    lo = (a - hi.to(tl.float32)).to(b.dtype)
    return tl.dot(lo, b, tl.dot(hi, b, acc, input_precision=PREC), input_precision=PREC)


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
    VARLEN: tl.constexpr, TANGENT_FP32: tl.constexpr = False, TMA: tl.constexpr = False,
    SKIP_INTERIOR: tl.constexpr = False, TV_ACC: tl.constexpr = False,
):
    """One program: BLOCK_M query rows of one (batch, query head); online softmax over key blocks.

    TMA: the key-loop tiles (K, V, tK, tV) come through tensor descriptors over this (batch, kv head)'s
    (Lk, D) rows (TMA on Hopper and later; rows >= Lk and columns >= D zero-fill), which keeps them out
    of the registers the pointer loads hold (the launcher sets it where the strides allow, launch.Plan).

    The tangent numerator is accumulated around a running shift c (the running mu = r / l):
    tacc = sum_j P~_j (tV_j + (tS_j - c) V_j), and when c moves to c' the accumulated part is moved by
    (c - c') acc. At the end c = mu, so tO = tacc / l with no cancellation left: the operand P~ (tS - c)
    rounded to 16 bits before its product with V is small where P~ is large, even at logits of 100.

    SKIP_INTERIOR: interior key blocks skip the mask arithmetic (see :func:`_mask_logits`).

    TV_ACC: the P~ tV products accumulate apart (tacc_v: rescaled by alpha only, the shift does not touch
    them), so that every product after the tangent logits accumulates into a loop-carried accumulator and
    stays asynchronous on wgmma: 3 waits per key block instead of 4, for one more BLOCK_M x BLOCK_DV float32
    accumulator (the launcher sets it where that is spill-free, launch.Plan)."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    total_q = Lq  # packed sequences (VARLEN): the per-row float32 buffers (lse, mu, ...) are (H, total_q)
    bq, Lq = _sequence(b, CU_Q, Lq, VARLEN)
    bk, Lk = _sequence(b, CU_K, Lk, VARLEN)
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
        if TV_ACC:
            tl.static_assert(not TANGENT_FP32, "TV_ACC takes 16-bit probabilities")
            tacc_v = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        r_i = tl.zeros([BLOCK_M], tl.float32)
        shift = tl.zeros([BLOCK_M], tl.float32)
    if TMA:
        k_desc = tl.make_tensor_descriptor(k_base, [Lk, D], [skn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, [Lk, DV], [svn, 1], [BLOCK_N, BLOCK_DV])
        if TANGENT:
            tk_desc = tl.make_tensor_descriptor(tk_base, [Lk, D], [stkn, 1], [BLOCK_N, BLOCK_D])
            tv_desc = tl.make_tensor_descriptor(tv_base, [Lk, DV], [stvn, 1], [BLOCK_N, BLOCK_DV])

    hi = Lk
    if IS_CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)  # key blocks entirely above the diagonal are skipped
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if TMA:
            k = k_desc.load([start_n, 0])
        else:
            k = _load_tile(k_base, offs_n, offs_d, Lk, skn, skd, D, BLOCK_D, ALIGN)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = _mask_logits(s, start_m, start_n, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True,
                         SKIP_INTERIOR)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = _exp_rel(m_i, m_safe, MASK_KIND)
        p = _exp_rel(s, m_safe[:, None], MASK_KIND)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = _load_tile(v_base, offs_n, offs_dv, Lk, svn, svd, DV, BLOCK_DV, ALIGN)
        acc = acc * alpha[:, None]
        if TANGENT:  # before acc takes this block: the shift's move applies to the earlier blocks only
            if TMA:
                tk = tk_desc.load([start_n, 0])
            else:
                tk = _load_tile(tk_base, offs_n, offs_d, Lk, stkn, stkd, D, BLOCK_D, ALIGN)
            ts = (tl.dot(tq, tl.trans(k), input_precision=PREC)
                  + tl.dot(q, tl.trans(tk), input_precision=PREC)) * scale
            pts = p * ts
            r_i = r_i * alpha + tl.sum(pts, 1)
            shift_new = tl.where(l_i > 0.0, r_i / tl.where(l_i > 0.0, l_i, 1.0), 0.0)
            tacc = tacc * alpha[:, None] + (shift - shift_new)[:, None] * acc
            # (tV is loaded after the first product: earlier, its tile is live across it and D=72/256 spill more)
            if TANGENT_FP32:  # a float32 tO: the probabilities enter the products in two 16-bit parts
                tacc = _dot_split(pts - p * shift_new[:, None], v, tacc, PREC)
            else:
                tacc += tl.dot((pts - p * shift_new[:, None]).to(dt), v, input_precision=PREC)
            if TMA:
                tv = tv_desc.load([start_n, 0])
            else:
                tv = _load_tile(tv_base, offs_n, offs_dv, Lk, stvn, stvd, DV, BLOCK_DV, ALIGN)
            if TV_ACC:
                tacc_v = tacc_v * alpha[:, None] + tl.dot(p.to(dt), tv, input_precision=PREC)
            elif TANGENT_FP32:
                tacc = _dot_split(p, tv, tacc, PREC)
            else:
                tacc += tl.dot(p.to(dt), tv, input_precision=PREC)
            shift = shift_new
        if TANGENT_FP32:  # (acc enters tO through the shift term: as accurate as the tangent products)
            acc = _dot_split(p, v, acc, PREC)
        else:
            acc += tl.dot(p.to(dt), v, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if MASK_KIND == 2:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe) * 0.6931471805599453)
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row = _row_offset(b, h, H, bq, Lq, total_q, VARLEN)
    _store_tile(O + bq * sob + h * soh, o, offs_m, offs_dv, Lq, som, sod, DV, BLOCK_DV, ALIGN)
    tl.store(LSE + row + offs_m, lse, mask=offs_m < Lq)
    if TANGENT:
        mu = r_i / l_safe
        if TV_ACC:
            tacc += tacc_v
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
    total_q = Lq  # packed sequences (VARLEN): the per-row float32 buffers (mu, const, c) are (H, total_q)
    bq, Lq = _sequence(b, CU_Q, Lq, VARLEN)
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    row = _row_offset(b, h, H, bq, Lq, total_q, VARLEN)
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
            s = _mask_logits(s, start_m, start_n, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True,
                             False)
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
    Q, K, V, TQ, TK, TV, DO, DTO, LSE, LINV, MU, CONST, CROW, MASK, CU_Q, CU_K, DK, DV_, DTK, DTV, DQA, DTQA,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    stqb, stqh, stqm, stqd, stkb, stkh, stkn, stkd, stvb, stvh, stvn, stvd,
    sdob, sdoh, sdom, sdod, sgb, sgh, sgm, sgd,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
    Hkv, G, Lq, Lk, scale,
    D: tl.constexpr, DV: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    TANGENT: tl.constexpr, HAS_DO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DTK: tl.constexpr, WANT_DV: tl.constexpr,
    ADD_DQ_DS: tl.constexpr, ADD_DQ_DTS: tl.constexpr, ADD_DTQ: tl.constexpr, ALIGN: tl.constexpr,
    LARGE_OFFSETS: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr = False, TMA_ADD: tl.constexpr = False,
):
    """One program: BLOCK_N keys of one (batch, kv head); loops over its G query heads and the query
    blocks, in transposed tiles (keys x queries). Tangent terms only when TANGENT.

    TMA: the query-side tiles of the loop (Q, tQ, dO, dtO) load, and dK, dtK, dV, dtV store, through tensor
    descriptors over each head's (L, D) rows (rows past L zero-fill / are dropped): no pointer or mask
    tensors in registers (sm_90a, D = 64: 32 query columns fit one warpgroup without spilling). TMA_ADD (with
    TMA): the dQ / dtQ adds of the one-pass backward are tensor-descriptor reductions.

    P = exp(S - lse) from LSE; with an additive mask (MASK_KIND 2) P = exp(S - LSE) * LINV from the row
    statistics of :func:`_attn_row_stats` (LSE then holds a row max, LINV 1 / l).

    WANT_DK / WANT_DTK / WANT_DV select the outputs (dV and dtV go together): one launch with all three,
    or split launches that hold fewer fp32 accumulators and resident tiles in registers at large head
    dims, for a few recomputed products (the launch parts of :class:`.configs.LaunchParts`).

    ADD_DQ_DS / ADD_DQ_DTS / ADD_DTQ (the one-pass backward): each tile also adds its share of dQ's
    dS K term, dQ's dtS tK term and dtQ = dtS K (times scale) to the float32 DQA / DTQA with atomics, from
    the dS and dtS it already holds: 5 products per tile for the primal backward, 15 with tangents. The
    query-block kernel is then not launched. ADD_DQ_DS needs WANT_DK (dS); the others need tangents.
    """
    start_n = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    total_q = Lq  # packed sequences (VARLEN): the per-row float32 buffers (lse, mu, ...) are (H, total_q)
    bq, Lq = _sequence(b, CU_Q, Lq, VARLEN)
    bk, Lk = _sequence(b, CU_K, Lk, VARLEN)
    if start_n >= Lk:  # a key block past a shorter packed sequence's end: no rows, no dQ terms
        return
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
    tl.static_assert(WANT_DK or not ADD_DQ_DS, "ADD_DQ_DS needs WANT_DK")
    tl.static_assert(TANGENT or not (ADD_DQ_DTS or ADD_DTQ), "ADD_DQ_DTS / ADD_DTQ need TANGENT")
    tl.static_assert((WANT_DK or WANT_DTK) or not (ADD_DQ_DTS or ADD_DTQ), "ADD_DQ_DTS / ADD_DTQ need dtS")
    if TANGENT:
        if WANT_DK or WANT_DV or ADD_DQ_DTS:
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
        row = _row_offset(b, h, H, bq, Lq, total_q, VARLEN)
        q_base = Q + bq * sqb + h * sqh
        do_base = DO + bq * sdob + h * sdoh
        m_base = MASK + b * smb + h * smh
        dq_base = DQA + bq * sdqb + h * sdqh
        dtq_base = DTQA + bq * sdqb + h * sdqh
        if TANGENT:
            tq_base = TQ + bq * stqb + h * stqh
            g_base = DTO + bq * sgb + h * sgh
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, [Lq, D], [sqm, 1], [BLOCK_M, BLOCK_D])
            if HAS_DO:
                do_desc = tl.make_tensor_descriptor(do_base, [Lq, DV], [sdom, 1], [BLOCK_M, BLOCK_DV])
            if TANGENT:
                tq_desc = tl.make_tensor_descriptor(tq_base, [Lq, D], [stqm, 1], [BLOCK_M, BLOCK_D])
                g_desc = tl.make_tensor_descriptor(g_base, [Lq, DV], [sgm, 1], [BLOCK_M, BLOCK_DV])
        for start_m in range(lo, Lq, BLOCK_M):
            offs_m = start_m + offs_m0
            in_m = offs_m < Lq
            if TMA:
                q = q_desc.load([start_m, 0])
            else:
                q = _load_tile(q_base, offs_m, offs_d, Lq, sqm, sqd, D, BLOCK_D, ALIGN)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            # (every tile masked: a branch around it cost the split [dk,dq_ds] launch 8 B of spill at D = 128)
            st = _mask_logits(st, start_n, start_m, offs_n, offs_m, Lk, Lq, m_base, smn, smm, IS_CAUSAL, MASK_KIND,
                              False, False)
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
                    if TMA:
                        do = do_desc.load([start_m, 0])
                    else:
                        do = _load_tile(do_base, offs_m, offs_dv, Lq, sdom, sdod, DV, BLOCK_DV, ALIGN)
                if WANT_DV:
                    dv += tl.dot(pt.to(dt), do, input_precision=PREC)
                if WANT_DK:
                    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            elif WANT_DK:
                dpt = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            if TANGENT:
                if TMA:
                    gg = g_desc.load([start_m, 0])
                else:
                    gg = _load_tile(g_base, offs_m, offs_dv, Lq, sgm, sgd, DV, BLOCK_DV, ALIGN)
                if WANT_DK or WANT_DV:
                    if TMA:
                        tq = tq_desc.load([start_m, 0])
                    else:
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
                        dst16 = (pt * (dpt - const[None, :])).to(dt)
                        if BLOCK_D <= 128:  # chained into dk: dk + (a + b) holds a second float32 accumulator
                            dk = tl.dot(dtst16, tq, tl.dot(dst16, q, dk, input_precision=PREC), input_precision=PREC)
                        else:  # (chained, D = 256 spilled 19 KB instead of 5 KB on sm_86)
                            dk += tl.dot(dst16, q, input_precision=PREC) + tl.dot(dtst16, tq, input_precision=PREC)
            elif WANT_DK:
                dst16 = (pt * (dpt - const[None, :])).to(dt)
                dk += tl.dot(dst16, q, input_precision=PREC)
            if ADD_DQ_DS and ADD_DQ_DTS:
                dqt = tl.dot(tl.trans(dtst16), tk, tl.dot(tl.trans(dst16), k, input_precision=PREC),
                             input_precision=PREC)
            elif ADD_DQ_DS:
                dqt = tl.dot(tl.trans(dst16), k, input_precision=PREC)
            elif ADD_DQ_DTS:
                dqt = tl.dot(tl.trans(dtst16), tk, input_precision=PREC)
            if ADD_DQ_DS or ADD_DQ_DTS:
                _atomic_add_rows(dq_base, dqt * scale, start_m, offs_m, offs_d, Lq, sdqm, sdqd, D, BLOCK_M, BLOCK_D,
                                 TMA_ADD)
            if ADD_DTQ:
                _atomic_add_rows(dtq_base, tl.dot(tl.trans(dtst16), k, input_precision=PREC) * scale, start_m, offs_m,
                                 offs_d, Lq, sdqm, sdqd, D, BLOCK_M, BLOCK_D, TMA_ADD)
    if WANT_DK:
        _store_rows(DK + bk * sdkb + hk * sdkh, dk * scale, start_n, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_N,
                    BLOCK_D, ALIGN, TMA)
    if WANT_DTK:
        _store_rows(DTK + bk * sdkb + hk * sdkh, dtk * scale, start_n, offs_n, offs_d, Lk, sdkn, sdkd, D, BLOCK_N,
                    BLOCK_D, ALIGN, TMA)
    if WANT_DV:
        _store_rows(DV_ + bk * sdvb + hk * sdvh, dv, start_n, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_N,
                    BLOCK_DV, ALIGN, TMA)
        if TANGENT:
            _store_rows(DTV + bk * sdvb + hk * sdvh, dtv, start_n, offs_n, offs_dv, Lk, sdvn, sdvd, DV, BLOCK_N,
                        BLOCK_DV, ALIGN, TMA)


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
    ALIGN: tl.constexpr, LARGE_OFFSETS: tl.constexpr, VARLEN: tl.constexpr, SKIP_INTERIOR: tl.constexpr = False,
):
    """One program: BLOCK_M query rows of one (batch, query head); loops over key blocks.

    dQ = scale sum_n (dS K + dtS tK) and dtQ = scale sum_n dtS K. DQ_DS / DQ_DTS select the terms of dQ
    written to DQ, WANT_DTQ writes dtQ; ADD_PARTIAL adds the float32 partial dQ at DQP (written by an
    earlier launch) before the store. One launch does all (see :class:`.configs.LaunchParts` for the splits,
    which hold fewer resident tiles in registers at large head dims). Without TANGENT only the dS K term exists.
    P as in :func:`_attn_bwd_dkdv` (LSE, or row max and LINV with an additive mask).
    """
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # grid (blocks, heads, batch): each axis within CUDA's limits
    b = tl.program_id(2).to(tl.int64)
    total_q = Lq  # packed sequences (VARLEN): the per-row float32 buffers (lse, mu, ...) are (H, total_q)
    bq, Lq = _sequence(b, CU_Q, Lq, VARLEN)
    bk, Lk = _sequence(b, CU_K, Lk, VARLEN)
    hk = h // G
    offs_m = _block_offsets(start_m, BLOCK_M, LARGE_OFFSETS)
    offs_n0 = _block_offsets(0, BLOCK_N, LARGE_OFFSETS)
    offs_d = _block_offsets(0, BLOCK_D, LARGE_OFFSETS)
    offs_dv = _block_offsets(0, BLOCK_DV, LARGE_OFFSETS)
    in_m = offs_m < Lq
    dt = Q.dtype.element_ty
    row = _row_offset(b, h, H, bq, Lq, total_q, VARLEN)

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
        s = _mask_logits(s, start_m, start_n, offs_m, offs_n, Lq, Lk, m_base, smm, smn, IS_CAUSAL, MASK_KIND, True,
                         SKIP_INTERIOR)
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
