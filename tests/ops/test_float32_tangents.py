"""Float32 tangents of float16/bfloat16 operands through the DiT primitives' explicit ``*_jvp`` forms, on
every backend, against the float64 JVP of the formulas in tests/ops/helpers.py at the same (16-bit)
operand values.

y keeps the operands' dtype (16-bit tolerance); ty comes back in float32 and is never rounded to 16 bits,
so it must meet the float32 tolerance (plus the summation-order roundoff of rows of up to 384 channels),
far below what a 16-bit ty reaches (the last test measures both). Gradients of a loss on (y, ty) reach
every operand (in its dtype) and every tangent (float32).
"""
import pytest
import torch

import flowmap_kernels.ops as ops
from flowmap_kernels import use_backend
from tests.numerics import TOLERANCE, rel_err, tolerance
from tests.ops.helpers import make_inputs
from tests.ops.test_functional import _cases

BACKENDS = ["torch", "extension", "naive"]
# row sums of up to 384 float32 products (LayerNorm statistics, linear): a few hundred roundoffs
FP32_TANGENT_TOL = tolerance(torch.float32, 400)


def _inputs(name, C, dtype, seed=0):
    _, ref, shapes, explicit, scales = _cases(C)[name]
    prim, tang = make_inputs(shapes, dtype, seed=seed, scale=scales)
    return ref, explicit, prim, [t.float() * 1.3 for t in tang]  # tangents with more than 16 bits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("C", [37, 384])
@pytest.mark.parametrize("name", list(_cases(8)))
def test_float32_tangents_against_float64(name, C, dtype, backend):
    ref, explicit, prim, tang = _inputs(name, C, dtype, seed=C)
    p64, t64 = [p.double() for p in prim], [t.double() for t in tang]
    y_ref, ty_ref = torch.func.jvp(ref, tuple(p64), tuple(t64))
    leaves = [x.clone().requires_grad_() for x in prim + tang]
    with use_backend(backend):
        y, ty = explicit(*leaves)
    assert y.dtype == dtype and ty.dtype == torch.float32
    assert rel_err(y, y_ref) < TOLERANCE[dtype]
    assert rel_err(ty, ty_ref) < FP32_TANGENT_TOL
    g = torch.Generator().manual_seed(1)
    wy, wt = torch.randn(y.shape, generator=g, dtype=torch.float64), torch.randn(ty.shape, generator=g,
                                                                              dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * wy).sum() + (ty.double() * wt).sum(), leaves)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    yr, tyr = torch.func.jvp(ref, tuple(ref_leaves[:len(prim)]), tuple(ref_leaves[len(prim):]))
    ref_grads = torch.autograd.grad((yr * wy).sum() + (tyr * wt).sum(), ref_leaves)
    for i, (a, b, x) in enumerate(zip(grads, ref_grads, leaves)):
        assert a.dtype == x.dtype
        assert rel_err(a, b) < TOLERANCE[dtype], (i, rel_err(a, b))


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_float32_tangent_is_more_accurate_than_a_16_bit_one(backend):
    """The same JVP with 16-bit tangents (the default) and with float32 ones: the float32 tangent is exact to
    float32 where the 16-bit one carries bfloat16 rounding."""
    ref, explicit, prim, tang = _inputs("modulated_layer_norm", 384, torch.bfloat16, seed=3)
    tang16 = [t.bfloat16() for t in tang]
    _, ty_ref = torch.func.jvp(ref, tuple(p.double() for p in prim), tuple(t.double() for t in tang16))
    with use_backend(backend):
        _, ty16 = explicit(*prim, *tang16)
        _, ty32 = explicit(*prim, *[t.float() for t in tang16])  # the same tangent values, carried in float32
    e16, e32 = rel_err(ty16, ty_ref), rel_err(ty32, ty_ref)
    print(f"\nmodulated_layer_norm C=384 bf16: ty error {e16:.2e} (bf16 tangent), {e32:.2e} (float32 tangent)")
    assert ty16.dtype == torch.bfloat16 and ty32.dtype == torch.float32
    assert e32 < FP32_TANGENT_TOL < e16


def test_tangent_dtype_errors_name_the_argument():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    w = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"tx: expected shape \(2, 8\), torch.bfloat16 \(or float32\)"):
        ops.rms_norm_jvp(x, w, torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"tx: expected shape \(2, 8\), torch.float32 on"):
        ops.rms_norm_jvp(x.float(), w.float(), torch.randn(2, 8, dtype=torch.float64))
