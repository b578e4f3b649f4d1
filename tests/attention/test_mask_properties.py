"""Property-based: random float and bool masks holding finfo(dtype).min, -inf and large finite values (whole
rows of them too), on every backend and dtype, against float64 scaled_dot_product_attention (CPU, math
backend) and its torch.func.jvp: O and the tangent tO; and the gradients of a loss on both (backward
through the tangent) for q, k, v and their tangents against tests/reference.py.

SDPA's semantics: a row whose keys are all -inf / False gives 0 (and tangent 0); a row whose keys all carry
the same huge finite value (finfo.min) is a softmax over the scores, which the huge value may absorb in
rounding (uniform weights) -- in float64 as in the accumulation dtype once |logit| > ~1e17.

Tolerance: tests/numerics.py tolerance(dtype, 4 L + CANCELLATION): TOLERANCE[dtype] plus 4 u L for the
rounding of the logits in the accumulation dtype (float32 for 16/32-bit inputs, u = 2^-24): a logit of size
L is off by up to u L, which moves its weight by that relative amount; L counts logits that carry weight
(P > 1e-6) and that float64 resolves (|L| < 1e15; larger ones absorb the score in float64 as well). Plus
CANCELLATION u for the tiny random problems whose gradients are small beside their summands (measured
1.7e-5 = 280 u, dq of a 3 x 2 problem; 1600 u keeps the former float32 bound of 1e-4 and is negligible
beside the 16-bit entries). The "triton" entry runs in Triton's CPU interpreter (marked ``interpreter``)
with few examples.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import flowmap_kernels as fk
from flowmap_kernels.attention import make_problem, resolve_backend
from tests.attention.backend_env import BACKENDS, on_backend
from tests.numerics import rel_err, tolerance
from tests.reference import loss_on_outputs, ref_grads

SPECIALS = ["-inf", "min", "-large", "+large", "-half_max"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _special_value(name: str, dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return {"-inf": -math.inf, "min": fi.min, "-large": -1e4, "+large": 1e3, "-half_max": -fi.max / 2}[name]


@st.composite
def mask_cases(draw):
    kv_heads = draw(st.integers(1, 2))
    return dict(
        batch=draw(st.integers(1, 2)), kv_heads=kv_heads, q_heads=kv_heads * draw(st.integers(1, 2)),
        q_len=draw(st.integers(1, 12)), kv_len=draw(st.one_of(st.integers(1, 12), st.integers(30, 70))),
        head_dim=draw(st.integers(1, 16)),
        kind=draw(st.sampled_from(["float", "bool"])),
        mask_shape=draw(st.sampled_from(["LqLk", "B1LqLk", "BHLqLk", "1H1Lk"])),
        specials=draw(st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=len(SPECIALS), unique=True)),
        special_fraction=draw(st.sampled_from([0.1, 0.5, 0.9, 1.0])),
        whole_row=draw(st.sampled_from([None, "min", "-half_max", "-large", "-inf"])),
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 1.0, 4.0]))),
        explicit=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def _make(case: dict, dtype: torch.dtype):
    g = torch.Generator().manual_seed(case["seed"])
    B, Hq, Hkv, Lq, Lk, D = (case[n] for n in ("batch", "q_heads", "kv_heads", "q_len", "kv_len", "head_dim"))

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D)
    tq, tk, tv = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D)
    shape = {"LqLk": (Lq, Lk), "B1LqLk": (B, 1, Lq, Lk), "BHLqLk": (B, Hq, Lq, Lk), "1H1Lk": (1, Hq, 1, Lk)}[
        case["mask_shape"]]
    special = torch.rand(shape, generator=g) < case["special_fraction"]
    if case["kind"] == "bool":
        mask = ~special  # True = may attend; whole rows False when the fraction is 1
        if case["whole_row"] is not None and shape[-2] > 1:
            mask[..., 0, :] = False
        return (q, k, v), (tq, tk, tv), mask
    values = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    choice = torch.randint(len(case["specials"]), shape, generator=g)
    for i, name in enumerate(case["specials"]):
        values = torch.where(special & (choice == i), _special_value(name, dtype), values)
    if case["whole_row"] is not None and shape[-2] > 1:  # one row entirely at one special value
        values[..., 0, :] = _special_value(case["whole_row"], dtype)
    return (q, k, v), (tq, tk, tv), values.to(dtype)


def _sdpa64(qkv, tangents, mask, gqa, scale):
    """Float64 SDPA (math backend) and its torch.func.jvp: the reference O and tO."""
    m = mask if mask.dtype == torch.bool else mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=m, scale=scale, enable_gqa=gqa),
            tuple(x.double() for x in qkv), tuple(t.double() for t in tangents))

CANCELLATION = 1600  # float32 roundoffs, see the module docstring


def _logit_size(qkv, mask, gqa, scale) -> float:
    """The largest |logit| below 1e15 among keys whose float64 weight exceeds 1e-6."""
    q, k, _ = (x.double() for x in qkv)
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, dim=-1)
    weighty = (p > 1e-6) & (s.abs() < 1e15)
    return float(torch.where(weighty, s.abs(), torch.zeros_like(s)).max()) if weighty.any() else 0.0


def _check(case: dict, backend: str, dtype: torch.dtype) -> None:
    qkv, tangents, mask = _make(case, dtype)
    gqa = case["q_heads"] != case["kv_heads"]
    kw = dict(attn_mask=mask, scale=case["scale"], enable_gqa=gqa)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    out_shape = (case["batch"], case["q_heads"], case["q_len"], case["head_dim"])
    wo, wt = (torch.randn(out_shape, generator=g, dtype=torch.float64) for _ in range(2))
    ro, rto = _sdpa64(qkv, tangents, mask, gqa, case["scale"])
    # gradients: tests/reference.py (SDPA's double backward is NaN on rows of -inf); its O agrees with SDPA's
    (o64, _), rgrads = ref_grads(*qkv, *tangents, wo, wt, **kw)
    assert rel_err(o64, ro) < 1e-12
    leaves = [x.detach().requires_grad_() for x in (*qkv, *tangents)]
    with on_backend(backend):
        assert resolve_backend(make_problem(*qkv, mask, 0.0, False, case["scale"], gqa)) == backend
        if case["explicit"]:
            o, to = fk.attention_jvp(*leaves, **kw)
        else:
            o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(leaves[:3]),
                                   tuple(leaves[3:]))
        grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
    assert o.dtype == dtype and to.dtype == dtype
    tol = tolerance(dtype, 4 * _logit_size(qkv, mask, gqa, case["scale"]) + CANCELLATION)
    assert torch.isfinite(o).all() and torch.isfinite(to).all()
    assert rel_err(o, ro) <= tol, (rel_err(o, ro), tol)
    assert rel_err(to, rto) <= 2 * tol, (rel_err(to, rto), tol)
    # 16-bit: the cotangents reach the backward rounded to 8 / 11 bits, which cancellation can amplify in a
    # small gradient: compare each gradient's error with the norm of all six instead of its own
    scale = torch.cat([r.flatten() for r in rgrads]).norm().item() if dtype.itemsize == 2 else None
    for name, gx, rg in zip(("q", "k", "v", "tq", "tk", "tv"), grads, rgrads):
        assert torch.isfinite(gx).all(), name
        err = rel_err(gx, rg) if scale is None else (gx.double() - rg).norm().item() / max(scale, 1e-300)
        assert err <= 4 * tol, (name, err, tol)
    dead = ro.abs().amax(-1) == 0  # rows with no allowed key: exactly zero, tangent too
    assert not o.abs().amax(-1)[dead].any() and not to.abs().amax(-1)[dead].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_masks_match_float64_sdpa(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton backend has no float64 (it runs on the 'torch' backend)")

    interpreted = backend == "triton"  # few examples and no shrinking: the interpreter is slow
    @settings(max_examples=6 if interpreted else 40, deadline=None, database=None, derandomize=True,
              phases=(Phase.explicit, Phase.generate) if interpreted else tuple(Phase),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=mask_cases())
    def run(case):
        _check(case, backend, dtype)

    run()


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_rows_at_finfo_min_are_a_softmax_over_the_scores(backend, dtype):
    """A fixed example of the hardest case: every key of a row at finfo(dtype).min, next to normal rows."""
    case = dict(batch=1, q_heads=2, kv_heads=1, q_len=5, kv_len=7, head_dim=8, kind="float", mask_shape="LqLk",
                specials=["min"], special_fraction=0.3, whole_row="min", scale=None, explicit=False, seed=11)
    _check(case, backend, dtype)
