"""Packed attention on the "triton" backend (the varlen_* launchers) in Triton's CPU interpreter.

Same checks as tests/attention/test_varlen.py (O, tO and the six gradients of a loss on both outputs
against the float64 per-sequence reference, within tests.numerics.TOLERANCE) with the backend named
explicitly on CPU tensors under TRITON_INTERPRET=1 (see conftest.py), plus the launchers' row statistics
against the blockwise ones.
"""
import pytest
import torch

from flowmap_kernels.attention import varlen_blockwise
from flowmap_kernels.attention.varlen_registry import ATTENTION_VARLEN, triton_launcher_module
import flowmap_kernels as fk
from tests.attention.test_varlen import CASES, NAMES, PATHS, _args, _check, reference
from tests.numerics import TOLERANCE, rel_err

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(triton_launcher_module() is None, reason="no Triton varlen launchers")]


@pytest.fixture(autouse=True)
def _fresh_triton_availability():
    impl = ATTENTION_VARLEN.impls["triton"]
    impl._available_cache = None
    yield
    impl._available_cache = None


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=lambda c: c.id())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_triton_matches_per_sequence_reference(case, dtype, path):
    _check(case, dtype, "triton", path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_launchers_match_blockwise_row_statistics(dtype):
    launchers = triton_launcher_module()
    case = CASES[3]
    t = case.make(dtype)
    xs = [t[n] for n in NAMES]
    rest = (t["cu_q"], t["cu_k"], 6, 8, True, 0.4)
    ours = launchers.varlen_jvp_forward(*xs, *rest)
    ref = varlen_blockwise.varlen_jvp_forward(*xs, *rest)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
    lse, ref_lse = ours[2], ref[2]
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse[finite]) <= 1e-5
    assert rel_err(ours[3], ref[3]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_primal_and_its_gradients(dtype, monkeypatch):
    """Without tangents (causal, Lq > Lk, GQA 3:1): O and dQ, dK, dV by the varlen_forward / varlen_backward
    launchers (counted) against the reference's primal gradients (a loss on O alone)."""
    launchers = triton_launcher_module()
    calls = []
    for name in ("varlen_forward", "varlen_backward"):
        real = getattr(launchers, name)
        monkeypatch.setattr(launchers, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    case = CASES[4]
    t = case.make(dtype, requires_grad=True)
    with fk.use_backend("triton"):
        o = fk.attention_varlen(t["q"], t["k"], t["v"], *_args(case, t), **case.kwargs)
        grads = torch.autograd.grad((o.double() * t["wo"]).sum(), [t["q"], t["k"], t["v"]])
    assert calls == ["varlen_forward", "varlen_backward"]
    # zero tangents and a zero weight on tO: the reference loss is (O * wo).sum()
    primal_only = {**t, "wt": torch.zeros_like(t["wt"]), **{"t" + n: torch.zeros_like(t[n]) for n in "qkv"}}
    ro, _, rgrads = reference(case, primal_only)
    tol = TOLERANCE[dtype]
    assert rel_err(o, ro) <= tol
    for n, g in zip(("q", "k", "v"), grads):
        assert rel_err(g, rgrads[n]) <= tol, n


def test_custom_ops_pass_opcheck_on_triton():
    """The fake implementations describe what the Triton launchers return (shapes, dtypes, strides)."""
    case = CASES[3]
    t = case.make(torch.float32)
    q, k, v, tq, tk, tv = (t[n] for n in NAMES)
    rest = (t["cu_q"], t["cu_k"], 6, 8, True, 0.4, "triton")
    ops = torch.ops.flowmap_kernels
    o, to, lse, mu = ops.attention_varlen_jvp_forward(q, k, v, tq, tk, tv, *rest)
    do = torch.randn_like(o)
    calls = [(ops.attention_varlen_forward, (q, k, v, *rest)),
             (ops.attention_varlen_jvp_forward, (q, k, v, tq, tk, tv, *rest)),
             (ops.attention_varlen_backward, (q, k, v, o, lse, do, *rest)),
             (ops.attention_varlen_jvp_backward, (q, k, v, tq, tk, tv, o, to, lse, mu, None, do, *rest))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_padded_head_dims(dtype, path):
    """Head dims 24 / 40 zero-padded to 32 / 64 (what sm90 / sm100 run; forced on here): same checks."""
    from flowmap_kernels.attention.triton import launch
    with launch.padded_head_dims(True):
        _check(CASES[2], dtype, "triton", path)


@pytest.mark.parametrize("case", [CASES[2], CASES[3]], ids=lambda c: c.id())
@pytest.mark.parametrize("path", list(PATHS))
def test_tensor_descriptors(case, path):
    """Tensor descriptors (TMA: forward+JVP key tiles, the key-block kernel's query tiles and gradient
    stores) over each packed sequence's rows, forced on here with the padding sm90 / sm100 use; with
    empty sequences (no query, no key, neither)."""
    from flowmap_kernels.attention.triton import launch
    with launch.padded_head_dims(True), launch.tensor_descriptors(True):
        _check(case, torch.bfloat16, "triton", path)
