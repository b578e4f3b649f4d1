"""Triton attention kernels in Triton's CPU interpreter against float64 references.

Every case runs the public API with ``fk.use_backend("triton")`` on CPU tensors (the registry allows
that only with TRITON_INTERPRET=1 and the backend named explicitly) and checks: the forward; the primal
backward (autograd); the explicit ``attention_jvp`` path; the ``torch.func.jvp`` path; and the backward
through the tangent (all six gradients of a loss on both O and tO). References: tests/reference.py
(naive float64 attention, torch.func.jvp over it, autograd gradients).

Inputs are tests.attention.cases.Case (the case type of the blockwise suites too). Tolerances: relative
norm error, tests/numerics.py TOLERANCE -- the interpreter's fp32 tl.dot is exact fp32, so only fp32
summation-order rounding remains (the gradients through the tangent amplify it: JVP_GRAD_AMPLIFICATION
float32 roundoffs more, tests/numerics.py tolerance); in fp16 / bf16 inputs and outputs are rounded to
11 / 8 significant bits (unit roundoff 4.9e-4 / 3.9e-3) and P, P*tS, dS, dtS are rounded to the input
dtype before their products, as on tensor cores, so errors of a few unit roundoffs are expected (see
docs/triton.md). In fp16 / bf16 the forward+JVP outputs and the gradients through the JVP must also stay
within 2x the error of the same computation by PyTorch in that dtype (the "naive" backend under
torch.func.jvp): tests/numerics.py assert_within_2x_torch (measured 1.2-1.8x).
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.attention.registry import ATTENTION
from flowmap_kernels.attention.triton import configs
from tests.attention.cases import Case
from tests.numerics import assert_within_2x_torch, rel_err, tolerance
from tests.reference import loss_on_outputs, ref_attention, ref_grads, ref_jvp

from .conftest import ensure_interpreted_kernels

ta = ensure_interpreted_kernels()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ERRORS: dict = {}  # (dtype, quantity) -> worst relative error measured (printed at the end with -s)
RATIOS: dict = {}  # (dtype, quantity) -> worst error / error of PyTorch in the same dtype (printed with -s)


def _make(case: Case, dtype):
    """q, k, v, tq, tk, tv in dtype (drawn in float64), float64 loss weights and the mask of ``case``."""
    t = case.make(dtype)
    return [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")], t["wo"], t["wt"], t.get("mask")


def _record(dtype, what, err):
    key = (str(dtype).replace("torch.", ""), what)
    ERRORS[key] = max(ERRORS.get(key, 0.0), err)


def _check(name, got, want, dtype, amplification=0.0):
    err, tol = rel_err(got, want), tolerance(dtype, amplification)
    _record(dtype, name, err)
    assert not torch.isnan(got).any(), f"{name}: NaN"
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.2e}"


def _within_2x_torch(name, got, want, torch_same_dtype, dtype):
    ratio = assert_within_2x_torch(got, want, torch_same_dtype, what=name)
    key = (str(dtype).replace("torch.", ""), name)
    if ratio is not None:  # None: PyTorch exact (a zero gradient), the floor decides
        RATIOS[key] = max(RATIOS.get(key, 0.0), ratio)


CASES = {  # "bool_dead_rows": every 3rd query row sees nothing
    "D16-L17": Case(batch=2, q_heads=2, kv_heads=2, q_len=17, kv_len=17, head_dim=16),
    "D48-L77-gqa-causal": Case(batch=1, q_heads=4, kv_heads=2, q_len=77, kv_len=77, head_dim=48, causal=True),
    "D72-200x300-dv40": Case(batch=1, q_heads=1, kv_heads=1, q_len=200, kv_len=300, head_dim=72, v_head_dim=40),
    "D96-33x50-bool": Case(batch=2, q_heads=2, kv_heads=2, q_len=33, kv_len=50, head_dim=96, mask="bool_dead_rows"),
    "D128-64x80-float-scale": Case(batch=1, q_heads=2, kv_heads=2, q_len=64, kv_len=80, head_dim=128,
                                   mask="float_expand", scale=0.3),
    "D64-L1": Case(batch=1, q_heads=2, kv_heads=2, q_len=1, kv_len=1, head_dim=64),
    "D32-1x17-causal": Case(batch=1, q_heads=3, kv_heads=1, q_len=1, kv_len=17, head_dim=32, causal=True),
    "D80-40x90-boolkeys-gqa": Case(batch=1, q_heads=4, kv_heads=1, q_len=40, kv_len=90, head_dim=80,
                                   mask="bool_keys"),
    # Lq > Lk, top-left aligned
    "D32-50x30-causal": Case(batch=2, q_heads=2, kv_heads=2, q_len=50, kv_len=30, head_dim=32, causal=True),
}


GRADS = ("dq", "dk", "dv", "dtq", "dtk", "dtv")
# The gradients through the JVP (a loss on O and 0.5 |tO|^2) sum float32 terms that cancel: measured worst
# 1.1e-5 = 190 float32 roundoffs (dq, dk in fp32; the 16-bit entries absorb it). tests/numerics.tolerance.
JVP_GRAD_AMPLIFICATION = 400


def _torch_same_dtype(q, k, v, tq, tk, tv, wo, wt, kw):
    """O, tO and the six gradients through the JVP by PyTorch math attention in the inputs' dtype
    (the "naive" backend under torch.func.jvp): the yardstick of assert_within_2x_torch."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    with fk.use_backend("naive"):
        o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(leaves[:3]), tuple(leaves[3:]))
        grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
    return o.detach(), to.detach(), grads


def _full_check(case: Case, dtype, seed=0):
    (q, k, v, tq, tk, tv), wo, wt, m = _make(dataclasses.replace(case, seed=seed), dtype)
    kw = dict(attn_mask=m, is_causal=case.causal, scale=case.scale, enable_gqa=case.q_heads != case.kv_heads)
    (ro, rto), rgrads = ref_grads(q, k, v, tq, tk, tv, wo, wt, **kw)
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if sixteen_bit:  # O, tO and the six gradients by PyTorch in this dtype
        t_o, t_to, t_grads = _torch_same_dtype(q, k, v, tq, tk, tv, wo, wt, kw)
        torch_same_dtype = (t_o, t_to, *t_grads)
    with fk.use_backend("triton"):
        # forward and primal backward through autograd
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        o = fk.attention(*leaves, **kw)
        _check("forward O", o, ro, dtype)
        ref_leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
        ref_primal = torch.autograd.grad(ref_attention(*ref_leaves, **kw), ref_leaves, wo)
        for nm, a, b in zip(("dq", "dk", "dv"), torch.autograd.grad(o, leaves, wo.to(dtype)), ref_primal):
            _check("backward " + nm, a, b, dtype)
        # explicit attention_jvp and the backward through both outputs
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
        o, to = fk.attention_jvp(*leaves, **kw)
        grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
        checks = [("jvp_forward O", o, ro, 0), ("jvp_forward tO", to, rto, 1)]
        checks += [("jvp_backward " + nm, a, b, 2 + i) for i, (nm, a, b) in enumerate(zip(GRADS, grads, rgrads))]
        # torch.func.jvp over the SDPA drop-in, with the tangent differentiated (reverse over forward)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
        o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(leaves[:3]), tuple(leaves[3:]))
        grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
        checks += [("func.jvp tO", to, rto, 1)]
        checks += [("func.jvp backward " + nm, a, b, 2 + i) for i, (nm, a, b) in enumerate(zip(GRADS, grads, rgrads))]
    for name, got, want, i in checks:  # forward+JVP outputs and the gradients through the JVP
        _check(name, got, want, dtype, JVP_GRAD_AMPLIFICATION if i >= 2 else 0.0)
        if sixteen_bit:
            _within_2x_torch(name, got, want, torch_same_dtype[i], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", list(CASES))
def test_all_paths_against_float64(case, dtype):
    _full_check(CASES[case], dtype)


def test_head_dim_256_once():
    _full_check(Case(batch=1, q_heads=2, kv_heads=2, q_len=24, kv_len=40, head_dim=256, causal=True), torch.float16)


def test_small_tiles_many_key_blocks():
    """32x16 tiles: many key blocks (online-softmax rescaling), causal block skipping, partial tiles."""
    with configs.override(configs.Config(32, 16, 4, 1)):
        _full_check(CASES["D48-L77-gqa-causal"], torch.float32, seed=3)
        _full_check(CASES["D96-33x50-bool"], torch.float16, seed=4)


@pytest.mark.parametrize("q_len,kv_len,causal", [(64, 96, True), (96, 48, True), (80, 48, False)])
def test_interior_tiles_skip_the_mask(q_len, kv_len, causal):
    """16x16 tiles on block-multiple lengths: most tiles are interior (no mask arithmetic: _mask_logits
    branches around it), the causal diagonal tiles and the ones past Lq (Lq < Lk) are not."""
    with configs.override(configs.Config(16, 16, 4, 1)):
        _full_check(Case(batch=1, q_heads=2, kv_heads=1, q_len=q_len, kv_len=kv_len, head_dim=16, causal=causal),
                    torch.float32, seed=q_len + kv_len)


def test_split_backward_kernels():
    """Split launches (the large-head-dim configs): dK+dtK | dV+dtV and dQ | dtQ (configs.BY_OUTPUT), and
    dK | dtK | dV+dtV with dtQ + dQ's dtS tK term into a float32 partial | dQ's dS K term (configs.BY_TERM)
    give the right gradients."""
    with configs.override(configs.Config(32, 32, 4, 1, configs.BY_OUTPUT)):
        _full_check(CASES["D80-40x90-boolkeys-gqa"], torch.float32, seed=6)
    with configs.override(configs.Config(32, 32, 4, 1, configs.BY_TERM)):
        _full_check(CASES["D48-L77-gqa-causal"], torch.bfloat16, seed=7)
        _full_check(CASES["D80-40x90-boolkeys-gqa"], torch.float32, seed=8)


@pytest.mark.parametrize("case,dtype", [("D48-L77-gqa-causal", torch.bfloat16), ("D16-L17", torch.float32),
                                        ("D128-64x80-float-scale", torch.float16)])
def test_forward_jvp_with_tensor_descriptors(case, dtype):
    """The forward+JVP's TMA loads (tensor descriptors over each head's (Lk, D) rows, zero-filled past Lk)
    and the key-block kernel's (query-side tiles in, dK dV dtK dtV out; 16-bit inputs): forced on in the
    interpreter, every path against float64 (one-pass and deterministic backwards)."""
    from flowmap_kernels.attention.triton import launch
    with launch.tensor_descriptors(True):
        q, k, v, tq, tk, tv = _make(CASES[case], dtype)[0]
        p = launch.Plan(q, k, v, None, False, 0.5)
        (o, to, lse, mu), fwd = launch.forward_launches(p, q, k, v, tq, tk, tv)
        assert [ln.name for ln in fwd] == ["jvp_forward[tma]"]
        for deterministic in (False, True):
            p = launch.Plan(q, k, v, None, False, 0.5, deterministic=deterministic)
            bwd = launch.backward_launches(p, q, k, v, tq, tk, tv, o, to, lse, mu, o, to)[1]
            key_block = [ln for ln in bwd if getattr(ln, "kernel", None) is p.kernels._attn_bwd_dkdv]
            assert key_block and all(ln.constexprs["TMA"] is (dtype != torch.float32) for ln in key_block)
        _full_check(CASES[case], dtype, seed=13)
        with deterministic_algorithms():
            _full_check(CASES[case], dtype, seed=14)


@pytest.mark.parametrize("parts", ["split2", "split3"])
@pytest.mark.parametrize("case", ["D48-L77-gqa-causal", "D96-33x50-bool"])
def test_split_one_pass_backward_with_tensor_descriptors(parts, case):
    """The one-pass backward's split launches (masked problems at D = 48 / 64 and D = 80..128 on sm90) with
    tensor descriptors forced on: each part adds its dQ / dtQ terms (all, dS K only, dtS tK with dtQ) through a
    tensor-descriptor reduction; against float64 with a causal GQA problem and a boolean mask with dead rows."""
    from flowmap_kernels.attention.triton import launch
    with launch.tensor_descriptors(True), configs.override(configs.Config(32, 32, 4, 1, configs.PARTS[parts])):
        _full_check(CASES[case], torch.bfloat16, seed=21)


def test_tensor_descriptors_only_where_the_strides_allow():
    from flowmap_kernels.attention.triton import launch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 9, 32, generator=g, dtype=torch.bfloat16)
    names = lambda *a: [ln.name for ln in launch.forward_launches(launch.Plan(*a[:3], None, False, 0.5), *a)[1]]  # noqa: E731
    with launch.tensor_descriptors(True):
        assert names(x, x, x, x, x, x) == ["jvp_forward[tma]"]
        wide = torch.randn(1, 2, 9, 36, generator=g, dtype=torch.bfloat16)[..., :32]  # rows of 72 bytes
        assert not launch.descriptors_allowed(wide)
        assert names(x, wide, x, x, x, x) == ["jvp_forward"]
        odd = torch.randn(1, 2, 9, 40, generator=g, dtype=torch.bfloat16)  # D = 40: masked columns
        assert names(odd, odd, odd, odd, odd, odd) == ["jvp_forward"]
        assert names(x, x, x) == ["forward"]  # the primal forward keeps its pointer loads
    assert names(x, x, x, x, x, x) == ["jvp_forward"]  # the interpreter's default: no descriptors
    assert launch.Plan(x, x, x, None, False, 0.5, arch="sm90").arch in launch.TMA_FAMILIES


def _kernel_inputs(dtype=torch.float32, causal=False, mask=None, seed=0):
    case = Case(batch=2, q_heads=2, kv_heads=2, q_len=37, kv_len=45, head_dim=40, v_head_dim=24, mask=mask, seed=seed)
    (q, k, v, tq, tk, tv), wo, wt, m = _make(case, dtype)
    return q, k, v, tq, tk, tv, wo.to(dtype), wt.to(dtype), m


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v, tq, tk, tv, do, dto, _ = _kernel_inputs()
    m = torch.ones(37, 45, dtype=torch.bool)
    m[::2] = False  # even query rows see no key
    o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, m, False, 0.2)
    assert torch.equal(o[:, :, ::2], torch.zeros_like(o[:, :, ::2]))
    assert torch.equal(to[:, :, ::2], torch.zeros_like(to[:, :, ::2]))
    assert torch.isneginf(lse[:, :, ::2]).all() and torch.isfinite(lse[:, :, 1::2]).all()
    assert torch.equal(mu[:, :, ::2], torch.zeros_like(mu[:, :, ::2]))
    grads = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.2)
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][:, :, ::2], torch.zeros_like(grads[0][:, :, ::2]))
    assert torch.equal(grads[3][:, :, ::2], torch.zeros_like(grads[3][:, :, ::2]))
    # float mask: -inf on whole rows (odd rows), stride-0 batch and head dims
    fm = torch.randn(37, 45)
    fm[1::2] = float("-inf")
    o2, to2, lse2, mu2 = ta.jvp_forward(q, k, v, tq, tk, tv, fm, False, 0.2)
    assert torch.equal(o2[:, :, 1::2], torch.zeros_like(o2[:, :, 1::2])) and torch.isfinite(o2).all()
    assert torch.equal(to2[:, :, 1::2], torch.zeros_like(to2[:, :, 1::2])) and torch.isfinite(to2).all()
    grads2 = ta.jvp_backward(q, k, v, tq, tk, tv, o2, to2, lse2, mu2, do, dto, fm, False, 0.2)
    assert all(torch.isfinite(g).all() for g in grads2)
    # every row masked: everything zero
    none = torch.zeros(37, 45, dtype=torch.bool)
    o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, none, False, 0.2)
    grads = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, none, False, 0.2)
    for x in (o, to, mu, *grads):
        assert torch.equal(x, torch.zeros_like(x))


def test_non_contiguous_inputs():
    """(B, L, H, D) storage viewed as (B, H, L, D), and a v sliced from a wider buffer."""
    g = torch.Generator().manual_seed(5)
    B, H, L, D = 2, 2, 29, 24
    mk = lambda: torch.randn(B, L, H, D, generator=g).transpose(1, 2)  # noqa: E731
    q, k, tq, tk = mk(), mk(), mk(), mk()
    v = torch.randn(B, H, L, 2 * D, generator=g)[..., ::2]
    tv = torch.randn(B, H, L, D + 8, generator=g)[..., 4:D + 4]
    assert not q.is_contiguous() and v.stride(-1) == 2
    (ro, rto) = ref_jvp(q, k, v, tq, tk, tv, is_causal=True)
    o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, None, True, D ** -0.5)
    assert rel_err(o, ro) < 1e-5 and rel_err(to, rto) < 1e-5
    do, dto = torch.randn_like(o), torch.randn_like(o)
    got = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do.transpose(1, 2).contiguous().transpose(1, 2),
                          dto, None, True, D ** -0.5)
    want = ta.jvp_backward(*(x.contiguous() for x in (q, k, v, tq, tk, tv)), o, to, lse, mu, do, dto, None, True,
                           D ** -0.5)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block (the backward's two-pass dQ)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) inside the test."""
    with deterministic_algorithms():
        yield


def _backward_launch_names(dtype, tangent: bool, parts=None) -> list:
    from flowmap_kernels.attention.triton import launch
    q, k, v, tq, tk, tv, do, dto, _ = _kernel_inputs(dtype)
    cm = configs.override(configs.Config(32, 32, 4, 1, parts)) if parts is not None else configs.override(
        configs.INTERPRETER_CONFIG)
    with cm:
        o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, None, False, 0.3)
        _, launches = launch.backward_launches(launch.Plan(q, k, v, None, False, 0.3), q, k, v, tq, tk, tv, o, to,
                                               lse, mu, do, dto if tangent else None)
    return [ln.name for ln in launches]


def test_one_pass_backward_is_the_default():
    """Without deterministic algorithms the backward is the row pre-pass, one key-block pass that adds dQ
    (dtQ) with atomics, and the cast of the float32 dQ (dtQ) to the inputs' dtype: no query-block pass."""
    assert _backward_launch_names(torch.bfloat16, True) == ["jvp_backward_prep", "jvp_backward_atomic",
                                                            "jvp_backward_atomic_cast", "jvp_backward_atomic_cast"]
    assert _backward_launch_names(torch.float32, False) == ["backward_prep", "backward_atomic"]  # dQ in place
    assert _backward_launch_names(torch.float16, True, configs.BY_TERM) == [
        "jvp_backward_prep", "jvp_backward_atomic[dk,dq_ds]", "jvp_backward_atomic[dtk,dtq,dq_dts]",
        "jvp_backward_atomic[dv,dtv]", "jvp_backward_atomic_cast", "jvp_backward_atomic_cast"]


def test_deterministic_backward_has_its_query_block_pass(deterministic):
    assert _backward_launch_names(torch.bfloat16, True) == ["jvp_backward_prep", "jvp_backward_dkdv",
                                                            "jvp_backward_dq"]
    assert _backward_launch_names(torch.float32, False) == ["backward_prep", "backward_dkdv", "backward_dq"]


@pytest.mark.parametrize("case,dtype", [("D48-L77-gqa-causal", torch.bfloat16), ("D72-200x300-dv40", torch.float32),
                                        ("D96-33x50-bool", torch.float16)])
def test_deterministic_mode_against_float64(case, dtype, deterministic):
    _full_check(CASES[case], dtype, seed=11)


def test_deterministic_mode_split_launches(deterministic):
    with configs.override(configs.Config(32, 32, 4, 1, configs.BY_TERM)):
        _full_check(CASES["D80-40x90-boolkeys-gqa"], torch.bfloat16, seed=12)


@pytest.mark.parametrize("mode", ["one_pass", "deterministic"])
def test_one_pass_and_deterministic_backwards_agree(mode, request):
    """Both modes give the same gradients up to float32 summation order (dQ, dtQ: atomics in key-block
    order vs one query-block loop), and the deterministic mode is bitwise repeatable."""
    q, k, v, tq, tk, tv, do, dto, m = _kernel_inputs(torch.float32, causal=False, mask="bool_dead_rows", seed=2)
    o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, m, False, 0.3)
    with configs.override(configs.Config(16, 16, 4, 1)):  # several key blocks add to each dQ row
        if mode == "deterministic":
            request.getfixturevalue("deterministic")
        a = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.3)
        b = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.3)
        torch.use_deterministic_algorithms(mode == "one_pass")  # the other mode
        c = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.3)
        torch.use_deterministic_algorithms(mode == "deterministic")
    if mode == "deterministic":
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for x, y in zip(a, c):
        assert rel_err(x, y) < 1e-6
    for x, y in zip(a[1:3] + a[4:], c[1:3] + c[4:]):  # dK, dV, dtK, dtV: the same launch in both modes
        assert torch.equal(x, y)


def test_deterministic_and_dto_none(deterministic):
    q, k, v, tq, tk, tv, do, dto, m = _kernel_inputs(torch.float16, mask="bool_dead_rows")
    o, to, lse, mu = ta.jvp_forward(q, k, v, tq, tk, tv, m, False, 0.3)
    a = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.3)
    b = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, m, False, 0.3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # no atomics: bitwise reproducible
    # dO = None drops the dO terms: equals the full gradient minus the primal backward's part
    g_t = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, None, dto, m, False, 0.3)
    g_p = ta.backward(q, k, v, o, lse, do, m, False, 0.3)
    for full, tang, prim in zip(a[:3], g_t[:3], g_p):
        assert rel_err(tang.float() + prim.float(), full.float()) < 5e-3
    for full, tang in zip(a[3:], g_t[3:]):
        assert torch.equal(full, tang)  # tangent-input grads do not involve dO
    # dtO = None: primal grads only
    dq, dk, dv, dtq, dtk, dtv = ta.jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, None, m, False, 0.3)
    assert dtq is None and dtk is None and dtv is None
    assert all(torch.equal(x, y) for x, y in zip((dq, dk, dv), g_p))


def test_registry_routes_cpu_only_when_named():
    q = torch.randn(1, 1, 4, 16)
    impl = ATTENTION.impls["triton"]
    assert impl.supports(explicit=False, device=q.device, dtype=q.dtype, head_dim=16, v_head_dim=16) is not None
    assert impl.supports(explicit=True, device=q.device, dtype=q.dtype, head_dim=16, v_head_dim=16) is None
    assert "float64" in impl.supports(explicit=True, device=q.device, dtype=torch.float64, head_dim=16,
                                      v_head_dim=16)
    cuda = torch.device("cuda")  # supports() only reads the device type: checkable without a GPU
    assert impl.supports(explicit=True, device=cuda, dtype=torch.bfloat16, head_dim=128, v_head_dim=128) is None
    assert impl.supports(explicit=True, device=cuda, dtype=torch.float32, head_dim=32, v_head_dim=32) is None
    assert impl.supports(explicit=True, device=cuda, dtype=torch.float32, head_dim=64, v_head_dim=64) is None
    for d in (40, 128):  # fp32 tiles that would spill (tests/test_backends.py has the whole rule)
        reason = impl.supports(explicit=True, device=cuda, dtype=torch.float32, head_dim=d, v_head_dim=d)
        assert reason is not None and "'torch'" in reason
    with pytest.raises(ValueError, match="head dim"):
        ta.forward(torch.randn(1, 1, 4, 272), torch.randn(1, 1, 4, 272), torch.randn(1, 1, 4, 16), None, False, 1.0)


def test_config_table_lookup():
    for kernel in configs.KERNELS:
        for arch in configs.ARCHS:
            for d in (16, 48, 72, 96, 128, 200, 256):
                for es in (2, 4):
                    c = configs.get_config(kernel, d, es, arch)
                    assert c.block_m >= 16 and c.block_n >= 16 and c.num_warps in (4, 8)
    assert configs.head_dim_bucket(72) == 128 and configs.head_dim_bucket(48, 80) == 128
    assert configs.get_config("forward", 64, 2, "interpret") == configs.INTERPRETER_CONFIG
    assert configs.get_config("jvp_forward", 128, torch.bfloat16, (9, 0)) == configs.get_config(
        "jvp_forward", 128, 2, "sm90") == configs.get_config("jvp_forward", 128, "bf16", "sm_90a")
    # the bucket decides (on sm90 / sm100 the launchers pad D = 72 to 128 and look up 128)
    assert configs.get_config("jvp_forward", 72, 2, "sm90") == configs.get_config("jvp_forward", 128, 2, "sm90")
    assert str(configs.get_config("jvp_backward_atomic", 128, 2, "sm90")) == "32x64/w4/s2/split3"
    with pytest.raises(ValueError, match="element_bytes"):
        configs.get_config("forward", 64, torch.int8, "sm90")
    with pytest.raises(ValueError, match="kernel"):
        configs.get_config("nope", 64, 2, "sm90")
    with pytest.raises(ValueError, match="arch"):
        configs.get_config("forward", 64, 2, "sm70")


def test_zz_report_errors(capsys):
    """Prints the worst measured error per dtype and quantity (run with -s to see it)."""
    if not ERRORS:  # run alone: measure one case first
        _full_check(CASES["D16-L17"], torch.float32)
    with capsys.disabled():
        for (dt, what), err in sorted(ERRORS.items()):
            print(f"  {dt:9s} {what:28s} {err:.2e}")
        for (dt, what), r in sorted(RATIOS.items()):
            print(f"  {dt:9s} {what:28s} error / same-precision PyTorch's {r:.2f}")
    worst = {dt: max(e for (d, _), e in ERRORS.items() if d == dt) for dt, _ in ERRORS}
    for dt, e in worst.items():
        assert e < tolerance(getattr(torch, dt), JVP_GRAD_AMPLIFICATION)


# float32 at D = 40 / Dv = 56: what sm90 / sm100 route to Triton by padding (configs.fp32_head_dim_supported)
PADDED_CASES = {**CASES, "D40-70x45-dv56-gqa-causal": Case(batch=1, q_heads=2, kv_heads=1, q_len=70, kv_len=45,
                                                           head_dim=40, v_head_dim=56, causal=True)}


@pytest.mark.parametrize("case,dtype", [("D72-200x300-dv40", torch.bfloat16), ("D96-33x50-bool", torch.float32),
                                        ("D80-40x90-boolkeys-gqa", torch.float16),
                                        ("D48-L77-gqa-causal", torch.bfloat16),
                                        ("D40-70x45-dv56-gqa-causal", torch.float32)])
def test_padded_head_dims(case, dtype, monkeypatch):
    """Head dims below their tile width run zero-padded to it on sm90 / sm100 (launch.launch_head_dims):
    forced on in the interpreter, every path against float64 (one-pass and deterministic backwards); the
    launches run at the tile width, and the outputs keep the inputs' head dims, contiguous."""
    from flowmap_kernels.attention.triton import launch
    run, dims = launch.run, set()

    def counting_run(launches):
        dims.update((ln.constexprs.get("D"), ln.constexprs["DV"]) for ln in launches
                    if isinstance(ln, launch.Launch) and "DV" in ln.constexprs)
        run(launches)
    monkeypatch.setattr(launch, "run", counting_run)
    with launch.padded_head_dims(True):
        q, k, v, tq, tk, tv = _make(PADDED_CASES[case], dtype)[0]
        assert launch.launch_head_dims(q.shape[-1], v.shape[-1], "interpret") == (
            configs.head_dim_bucket(q.shape[-1]), configs.head_dim_bucket(v.shape[-1]))
        assert launch.Plan(q, k, v, None, False, 0.5).pad_head_dims
        o, to, _, _ = ta.jvp_forward(q, k, v, tq, tk, tv, None, False, 0.5)
        assert o.shape == to.shape == (*q.shape[:3], v.shape[-1]) and o.is_contiguous() and to.is_contiguous()
        _full_check(PADDED_CASES[case], dtype, seed=17)
        with deterministic_algorithms():
            _full_check(PADDED_CASES[case], dtype, seed=18)
    widths = (configs.head_dim_bucket(q.shape[-1]), configs.head_dim_bucket(v.shape[-1]))
    assert dims == {widths} or dims == {widths, (None, widths[1])}, dims  # (the row pre-passes: DV only)
    assert launch.launch_head_dims(72, 40, "sm90") == launch.launch_head_dims(72, 40, "sm100") == (128, 64)
    assert launch.launch_head_dims(72, 40, "sm80") == launch.launch_head_dims(72, 40, "interpret") == (72, 40)
    assert launch.launch_head_dims(64, 128, "sm90") == (64, 128)
