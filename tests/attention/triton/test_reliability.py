"""Reliability of the Triton kernels in Triton's CPU interpreter, against float64 references.

- additive masks with extreme finite values (``torch.finfo(dtype).min``, the Hugging Face padding idiom;
  large positive values; rows mixing -inf and finite values) follow SDPA's semantics: a row masked
  everywhere by one finite value is a uniform softmax, not "no key allowed";
- the int64 row-offset kernels (LARGE_OFFSETS) and the launcher's decision to use them;
- 16-bit tangent accuracy at large logits (q scaled by up to 100);
- launches: CUDA grid limits (batch chunks, heads), device guard, pinned enable_fp_fusion.

References: tests/reference.py (float64 math attention, torch.func.jvp over it, autograd), on the inputs
rounded to the tested dtype, so only the kernels' own rounding is measured.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import triton.language as tl

from tests.numerics import TOLERANCE, rel_err, tolerance
from tests.reference import ref_attention, ref_jvp

from .conftest import ensure_interpreted_kernels, interpreted_jit

ta = ensure_interpreted_kernels()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_ids = lambda d: str(d).replace("torch.", "")  # noqa: E731


def _inputs(shape_q, shape_k, dv, dtype, seed, q_scale=1.0):
    """q, k, v, tq, tk, tv in dtype (drawn in float64; q times q_scale) and float64 cotangents dO, dtO."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Lq, D = shape_q
    Hkv, Lk = shape_k
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, tq = rnd(B, Hq, Lq, D) * q_scale, rnd(B, Hq, Lq, D)
    k, tk = rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    v, tv = rnd(B, Hkv, Lk, dv), rnd(B, Hkv, Lk, dv)
    do, dto = rnd(B, Hq, Lq, dv), rnd(B, Hq, Lq, dv)
    return [x.to(dtype) for x in (q, k, v, tq, tk, tv)], do.to(dtype), dto.to(dtype)


def _reference(xs, do, dto, mask, causal, scale):
    """float64 (O, tO), the six gradients of <dO, O> + <dtO, tO> and the primal gradients of <dO, O>."""
    gqa = xs[0].shape[1] != xs[1].shape[1]
    kw = dict(attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)
    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    o, to = ref_jvp(*leaves, **kw)
    grads = torch.autograd.grad((o * do.double()).sum() + (to * dto.double()).sum(), leaves)
    o_p = ref_attention(*leaves[:3], **kw)
    primal = torch.autograd.grad((o_p * do.double()).sum(), leaves[:3])
    return o.detach(), to.detach(), grads, primal


def _kernel_errors(xs, do, dto, mask, causal, scale):
    """Relative errors (vs float64) of every output of the four launchers; asserts no NaN."""
    ro, rto, rgrads, rprimal = _reference(xs, do, dto, mask, causal, scale)
    o, to, lse, mu = ta.jvp_forward(*xs, mask, causal, scale)
    o_fwd, lse_fwd = ta.forward(*xs[:3], mask, causal, scale)
    grads = ta.jvp_backward(*xs, o, to, lse, mu, do, dto, mask, causal, scale)
    primal = ta.backward(*xs[:3], o_fwd, lse_fwd, do, mask, causal, scale)
    got = dict(o=o, to=to, o_forward=o_fwd, **dict(zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads)),
               **dict(zip(("primal dq", "primal dk", "primal dv"), primal)))
    want = dict(o=ro, to=rto, o_forward=ro, **dict(zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), rgrads)),
                **dict(zip(("primal dq", "primal dk", "primal dv"), rprimal)))
    for name, x in got.items():
        assert not torch.isnan(x).any(), f"{name}: NaN"
    return {name: rel_err(got[name], want[name]) for name in got}, (o, to, lse, mu, grads)


# ----------------------------------------------------------------------------------------------------
# 1. additive masks with extreme finite values
# ----------------------------------------------------------------------------------------------------
LQ, LK = 37, 45


def _extreme_mask(dtype, seed=1):
    """(Lq, Lk) additive mask in dtype: small values, then rows and columns of extreme finite values."""
    g = torch.Generator().manual_seed(seed)
    fmin, fmax = torch.finfo(dtype).min, torch.finfo(dtype).max
    m = (0.5 * torch.randn(LQ, LK, generator=g, dtype=torch.float64)).to(dtype)
    m[:, 40:] = fmin                # Hugging Face padding: padded keys at finfo.min
    m[3] = fmin                     # a padded query row: every key at finfo.min -> uniform softmax
    m[5, ::2] = float("-inf")       # -inf and finfo.min mixed: uniform over the finite keys
    m[5, 1::2] = fmin
    m[7] = float("-inf")            # no key allowed: O = tO = 0, zero gradients
    m[9, :10] = 0.5 * fmax          # huge positive values: these ten keys take the whole softmax
    m[11] = -0.01 * fmax            # one large finite value everywhere (not finfo.min)
    m[13, 20:] = fmin               # a row of finfo.min with a few ordinary keys
    return m


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_extreme_finite_mask_values_follow_sdpa(dtype):
    xs, do, dto = _inputs((2, 2, LQ, 24), (2, LK), 24, dtype, seed=0)
    mask = _extreme_mask(dtype)
    errors, (o, to, lse, mu, grads) = _kernel_errors(xs, do, dto, mask, False, 0.3)
    for name, err in errors.items():
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.3e} >= {TOLERANCE[dtype]}"
    # the rows SDPA sends to a uniform softmax (finite -huge everywhere) give the mean of V (fp32, bf16:
    # finfo.min swallows the logits; fp16's finfo.min = -65504 does not, so there the logits still count)
    v = xs[2].double()
    if dtype != torch.float16:
        for row in (3, 11):
            assert rel_err(o[:, :, row], v.mean(dim=2)) < TOLERANCE[dtype]
        assert rel_err(o[:, :, 5], v[:, :, 1::2].mean(dim=2)) < TOLERANCE[dtype]
        assert rel_err(o[:, :, 9], v[:, :, :10].mean(dim=2)) < TOLERANCE[dtype]
    # no key allowed: exact zeros, lse = -inf, mu = 0
    for x in (o, to, grads[0], grads[3]):
        assert torch.equal(x[:, :, 7], torch.zeros_like(x[:, :, 7]))
    assert torch.isneginf(lse[:, :, 7]).all() and torch.equal(mu[:, :, 7], torch.zeros_like(mu[:, :, 7]))
    assert torch.isfinite(lse[:, :, 3]).all()


def test_extreme_finite_mask_causal_gqa_small_tiles():
    """Same mask, causal, GQA, 16x16 tiles (many key blocks: the online max moves across finfo.min)."""
    xs, do, dto = _inputs((1, 4, LQ, 24), (2, LK), 16, torch.float32, seed=2)
    mask = _extreme_mask(torch.float32, seed=3)
    mask[20, :15] = torch.finfo(torch.float32).min  # first blocks at finfo.min, later ordinary keys
    with ta.configs.override(ta.configs.Config(16, 16, 4, 1)):
        errors, _ = _kernel_errors(xs, do, dto, mask, True, 0.25)
    for name, err in errors.items():
        assert err < TOLERANCE[torch.float32], f"{name}: relative error {err:.3e}"


def test_row_statistics_only_where_lse_is_large():
    """The backward's row statistics keep lse (as row max, 1 / l = 1) on ordinary rows and recompute
    (max, 1 / l) on rows whose |lse| passes the limit; fully masked rows get +inf (P = 0)."""
    xs, do, dto = _inputs((1, 1, LQ, 24), (1, LK), 24, torch.float32, seed=4)
    mask = _extreme_mask(torch.float32)
    o, lse = ta.forward(*xs[:3], mask, False, 0.3)
    p = ta.Plan(*xs[:3], mask, False, 0.3)
    rowmax, rowinv = torch.empty_like(lse), torch.empty_like(lse)
    ta._launch(ta.kernels._attn_row_stats, 1, 1, 1, [xs[0], xs[1], lse, rowmax, rowinv, p.mask, *xs[0].stride(),
                                                     *xs[1].stride(), *p.mstrides, 1, 1, LQ, LK, 0.3,
                                                     ta.ROW_STATS_LSE_LIMIT],
               D=24, IS_CAUSAL=False, MASK_KIND=2, BLOCK_M=64, BLOCK_N=16, BLOCK_D=32, PREC="tf32x3", ALIGN=1,
               LARGE_OFFSETS=False)
    s = (xs[0].double() @ xs[1].double().transpose(-1, -2)) * 0.3 + mask.double()
    big = lse.abs() > ta.ROW_STATS_LSE_LIMIT
    big &= torch.isfinite(lse)
    assert big[0, 0, 3] and big[0, 0, 9] and not big[0, 0, 0]
    ordinary = ~big & torch.isfinite(lse)
    assert torch.equal(rowmax[ordinary], lse[ordinary])
    assert torch.equal(rowinv[ordinary], torch.ones_like(lse[ordinary]))
    assert torch.isposinf(rowmax[0, 0, 7])
    s32 = s.float()  # the kernels' float32 logits: finfo.min swallows Q K^T as in SDPA
    p_ref = torch.softmax(s32.double(), dim=-1)
    p_kernel = torch.exp(s32.double() - rowmax[..., None].double()) * rowinv[..., None].double()
    assert rel_err(p_kernel[big], p_ref[big]) < 1e-6


# ----------------------------------------------------------------------------------------------------
# 2. int64 row offsets
# ----------------------------------------------------------------------------------------------------
def _meta(shape, strides, dtype=torch.bfloat16):
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")  # sizes and strides only


def test_large_offsets_decision():
    L, H, D = 1 << 20, 32, 128  # (B, L, H, D) storage viewed as (B, H, L, D): row stride H * D
    q = _meta((1, H, L, D), (L * H * D, D, H * D, 1))
    assert ta.slice_offset_span(q) == (L - 1) * H * D + D - 1 > 2 ** 31
    assert ta.needs_large_offsets(q)
    small = _meta((1, 8, 1 << 19, 64), ((1 << 19) * 512, 64, 512, 1))
    assert ta.slice_offset_span(small) < 2 ** 31 - 1 and not ta.needs_large_offsets(small, None)
    edge = _meta((1, 1, 2, 2 ** 31 - 1), (0, 0, 0, 1))  # span exactly 2**31 - 2: int32 suffices
    assert not ta.needs_large_offsets(edge)
    assert ta.needs_large_offsets(_meta((1, 1, 2, 2), (0, 0, 2 ** 31, 1)))  # one row stride past 2**31 - 1
    # a (Lq, Lk) mask of 50,000 x 50,000 broadcast over batch and heads (stride 0): Lq Lk > 2**31
    Lq = Lk = 50_000
    qs = _meta((1, 2, Lq, 64), (2 * Lq * 64, Lq * 64, 64, 1))
    ks = _meta((1, 2, Lk, 64), (2 * Lk * 64, Lk * 64, 64, 1))
    mask = _meta((Lq, Lk), (Lk, 1), torch.bool)
    plan = ta.Plan(qs, ks, ks, mask, False, 0.125)
    assert plan.large_offsets and plan.constexprs()["LARGE_OFFSETS"] is True
    assert not ta.Plan(qs, ks, ks, None, False, 0.125).large_offsets
    with ta.large_offsets(True):
        assert ta.Plan(qs, ks, ks, None, False, 0.125).constexprs()["LARGE_OFFSETS"] is True
    with ta.large_offsets(False):
        assert not ta.Plan(qs, ks, ks, mask, False, 0.125).large_offsets


def test_block_offsets_int64_path_does_not_wrap():
    """What LARGE_OFFSETS changes, in the interpreter: offsets index x row stride past 2**31 wrap in
    int32 and are exact in int64 (the kernels' own helper)."""
    def offsets_kernel(OUT, stride, LARGE: tl.constexpr):
        offs = ta.kernels._block_offsets(0, 8, LARGE)
        tl.store(OUT + tl.arange(0, 8), (offs * stride).to(tl.int64))

    kernel = interpreted_jit(offsets_kernel)
    stride = 2 ** 30 + 3
    want = torch.arange(8, dtype=torch.int64) * stride
    out = torch.zeros(8, dtype=torch.int64)
    kernel[(1,)](out, stride, LARGE=True)
    assert torch.equal(out, want)
    kernel[(1,)](out, stride, LARGE=False)
    assert not torch.equal(out, want) and torch.equal(out[:2], want[:2])  # int32 wraps from 2 * stride on


def test_large_offsets_kernels_match_reference():
    """Every kernel compiled with LARGE_OFFSETS (int64 row offsets), forced on small inputs: float mask
    with a stride-0 query dim, GQA, causal, lengths that are not block multiples."""
    xs, do, dto = _inputs((2, 4, 33, 40), (2, 50), 24, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    mask = torch.randn(1, 4, 1, 50, generator=g).expand(2, 4, 33, 50)
    with ta.large_offsets(True), ta.configs.override(ta.configs.Config(16, 16, 4, 1, ta.configs.BY_TERM)):
        errors, _ = _kernel_errors(xs, do, dto, mask, True, 0.2)
    for name, err in errors.items():
        assert err < TOLERANCE[torch.float32], f"{name}: relative error {err:.3e}"


# ----------------------------------------------------------------------------------------------------
# 3. 16-bit accuracy at large logits
# ----------------------------------------------------------------------------------------------------
Q_SCALES = (1, 10, 30, 100)


def _max_logit(xs, scale):
    return (xs[0].double() @ xs[1].double().transpose(-1, -2)).abs().max().item() * scale


def _large_logit_tol(dtype, s_max):
    """Bound at logits up to ``s_max``: float32 rounds each logit by u |S| (2 |S| float32 roundoffs added,
    tests/numerics.py tolerance, as in the mask property test); in 16 bits the rounding of P and dS before
    their products grows with the logit range (bf16 primal dq: 2.5e-3 at max|S| 5, 1.4e-2 at 462, i.e.
    1.5x TOLERANCE), so twice the 16-bit bound."""
    return (2.0 if dtype.itemsize == 2 else 1.0) * tolerance(dtype, 2 * s_max)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_ids)
def test_large_logits_16bit(dtype):
    """q scaled by 1, 10, 30, 100 (max |S| up to ~450): O, tO and the primal and tangent gradients stay
    within the dtype's tolerance, and the tO error does not grow with the logit range (the tangent is
    accumulated around the running mu, so P (tS - mu) is what is rounded to 16 bits)."""
    to_err = {}
    for qs in Q_SCALES:
        xs, do, dto = _inputs((1, 2, 96, 32), (2, 96), 32, dtype, seed=7, q_scale=qs)
        do, dto = (do.double() / qs).to(dtype), (dto.double() / qs).to(dtype)  # keep fp16 gradients finite
        errors, _ = _kernel_errors(xs, do, dto, None, False, 32 ** -0.5)
        s_max = _max_logit(xs, 32 ** -0.5)
        tol = _large_logit_tol(dtype, s_max)
        for name, err in errors.items():
            assert err < tol, f"q x {qs}: {name}: relative error {err:.3e} >= {tol:.2e}"
        to_err[qs] = errors["to"]
        print(f"  {_ids(dtype)} q x {qs}: max|S| {s_max:.0f}, " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    for qs in Q_SCALES[1:]:
        assert to_err[qs] < 2.0 * to_err[1], f"tO error grows with the logits: {to_err}"


def test_large_logits_float32_and_masked():
    """float32 at q x 100, and bf16 at q x 100 with an additive mask (natural-unit path)."""
    xs, do, dto = _inputs((1, 2, 70, 32), (2, 80), 32, torch.float32, seed=8, q_scale=100)
    errors, _ = _kernel_errors(xs, do / 100, dto / 100, None, True, 32 ** -0.5)
    assert max(errors.values()) < _large_logit_tol(torch.float32, _max_logit(xs, 32 ** -0.5)), errors
    xs, do, dto = _inputs((1, 2, 70, 32), (2, 80), 32, torch.bfloat16, seed=9, q_scale=100)
    mask = torch.zeros(70, 80, dtype=torch.bfloat16)
    mask[:, ::3] = torch.finfo(torch.bfloat16).min
    do, dto = (do.double() / 100).to(torch.bfloat16), (dto.double() / 100).to(torch.bfloat16)
    errors, _ = _kernel_errors(xs, do, dto, mask, False, 32 ** -0.5)
    assert max(errors.values()) < _large_logit_tol(torch.bfloat16, _max_logit(xs, 32 ** -0.5)), errors
    assert errors["to"] < 1e-2


# ----------------------------------------------------------------------------------------------------
# 4. launches: grid limits, device guard, pinned options
# ----------------------------------------------------------------------------------------------------
class _RecordingKernel:
    """Stands in for a @triton.jit function: records kernel[grid](*args, **kwargs)."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_batch_chunks_and_head_limit():
    assert ta.batch_chunks(3, 8) == [(0, 3)]
    assert ta.batch_chunks(70_000, 16) == [(0, 65_535), (65_535, 70_000)]
    assert ta.batch_chunks(0, 16) == []
    with pytest.raises(ValueError, match="heads"):
        ta.batch_chunks(1, 70_000)
    with pytest.raises(ValueError, match="heads"):
        ta.forward(*(_meta((1, 70_000, 4, 16), (70_000 * 64, 64, 16, 1), torch.float16) for _ in range(3)),
                   None, False, 0.25)


def test_launch_splits_batch_pins_fp_fusion_and_guards_device(monkeypatch):
    kernel = _RecordingKernel()
    x = torch.arange(5 * 3).view(5, 3)
    monkeypatch.setattr(ta, "MAX_GRID_YZ", 2)
    ta._launch(kernel, 4, 2, 5, [x, 7, x[:, :1]], BLOCK_M=16)
    assert [c[0] for c in kernel.calls] == [(4, 2, 2), (4, 2, 2), (4, 2, 1)]
    for (b0, b1), (_, args, kwargs) in zip([(0, 2), (2, 4), (4, 5)], kernel.calls):
        assert torch.equal(args[0], x[b0:b1]) and args[1] == 7 and torch.equal(args[2], x[b0:b1, :1])
        assert args[0].data_ptr() == x[b0:b1].data_ptr()  # views, not copies
        assert kwargs == dict(enable_fp_fusion=True, BLOCK_M=16)
    assert ta.ENABLE_FP_FUSION is True
    with pytest.raises(ValueError, match="batch"):
        ta._launch(kernel, 1, 1, 5, [x, x[:2]])
    # device guard: torch.cuda.device(q.device) around CUDA launches (mocked: no GPU here), none on CPU
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with ta._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    assert isinstance(ta._device_guard(torch.device("cpu")), contextlib.nullcontext)
    guarded = []
    monkeypatch.setattr(ta, "_device_guard", lambda dev: guarded.append(dev) or contextlib.nullcontext())
    xs, do, dto = _inputs((1, 2, 9, 16), (2, 11), 16, torch.float32, seed=10)
    o, to, lse, mu = ta.jvp_forward(*xs, None, False, 0.25)
    ta.jvp_backward(*xs, o, to, lse, mu, do, dto, torch.zeros(9, 11), False, 0.25)
    assert len(guarded) == 4 and all(d == xs[0].device for d in guarded)  # fwd, prep, row stats, one pass


def test_batch_split_launches_match_reference(monkeypatch):
    """B = 5 with at most 2 batch entries per launch: all kernels, float mask broadcast over heads."""
    monkeypatch.setattr(ta, "MAX_GRID_YZ", 2)
    xs, do, dto = _inputs((5, 2, 19, 16), (1, 23), 16, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = torch.randn(5, 1, 19, 23, generator=g)
    mask[1, :, 4] = torch.finfo(torch.float32).min
    errors, _ = _kernel_errors(xs, do, dto, mask, False, 0.25)
    for name, err in errors.items():
        assert err < TOLERANCE[torch.float32], f"{name}: relative error {err:.3e}"


class _SharedMemoryLimitedKernel(_RecordingKernel):
    """Raises Triton's OutOfResources for tiles whose (stages x BLOCK_M x BLOCK_N) passes a budget."""

    def __init__(self, budget):
        super().__init__()
        self.budget, self.tried = budget, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kw):
            need = kw.get("num_stages", 1) * kw["BLOCK_M"] * kw["BLOCK_N"]
            self.tried.append((kw["BLOCK_M"], kw["BLOCK_N"], kw.get("num_stages", 1)))
            if need > self.budget:
                raise OutOfResources(need, self.budget, "shared memory")
            self.calls.append((grid, args, kw))
        return launch


def test_launch_falls_back_to_smaller_tiles_within_the_device_limits():
    x = torch.zeros(2, 3)
    # query-block kernel (the grid counts BLOCK_M blocks): stages first, then BLOCK_N halves; BLOCK_M kept
    k = _SharedMemoryLimitedKernel(budget=128 * 32)
    ta._launch(k, 4, 1, 2, [x], BLOCK_M=128, BLOCK_N=64, num_stages=2)
    assert k.tried == [(128, 64, 2), (128, 64, 1), (128, 32, 1)]
    assert len(k.calls) == 1 and k.calls[0][0] == (4, 1, 2) and k.calls[0][2]["BLOCK_M"] == 128
    # key-block kernel (the grid counts BLOCK_N blocks): BLOCK_M halves instead
    k = _SharedMemoryLimitedKernel(budget=32 * 64)
    ta._launch(k, 4, 1, 2, [x], grid_block="BLOCK_N", BLOCK_M=64, BLOCK_N=64, num_stages=1)
    assert k.tried == [(64, 64, 1), (32, 64, 1)] and k.calls[0][2]["BLOCK_N"] == 64
    # nothing fits: a clear error naming the limit and the tiles tried, not Triton's opaque one
    k = _SharedMemoryLimitedKernel(budget=1)
    with pytest.raises(RuntimeError, match=r"shared memory but this GPU allows 1 \(tiles tried: 64x64/s2, "
                                           r"64x64/s1, 64x32/s1, 64x16/s1\).*'torch' backend"):
        ta._launch(k, 4, 1, 2, [x], BLOCK_M=64, BLOCK_N=64, num_stages=2)


def test_smaller_configs_order():
    tries = ta.smaller_configs(dict(BLOCK_M=64, BLOCK_N=32, num_stages=3, num_warps=4), "BLOCK_M")
    assert [(t["BLOCK_M"], t["BLOCK_N"], t["num_stages"]) for t in tries] == [(64, 32, 3), (64, 32, 1), (64, 16, 1)]
    assert all(t["num_warps"] == 4 for t in tries)
