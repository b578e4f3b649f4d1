"""Each DiT primitive on each backend against float64 formulas written in tests/ops/helpers.py: value,
JVP along every input, gradients of a loss on (y, ty) for every primal and tangent, the explicit *_jvp
form; row sizes 37, 72, 384, 1152; float32 (<= 1e-5), float16 / bfloat16 (<= 2e-2)."""
import pytest
import torch

import flowmap_kernels.ops as ops
from flowmap_kernels import use_backend
from tests.ops.helpers import (check_op, make_inputs, ref_gated_residual, ref_gelu_tanh, ref_layer_norm, ref_linear,
                               ref_modulated_layer_norm, ref_rms_norm)

SIZES = [37, 72, 384, 1152]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["torch", "extension", "naive"]


def _cases(C):
    """op name -> (op, reference, shapes, explicit jvp, value scales)."""
    return {
        "modulated_layer_norm": (
            ops.modulated_layer_norm, ref_modulated_layer_norm, [(2, 3, C), (2, 1, C), (2, 1, C)],
            lambda x, h, s, tx, th, ts: ops.modulated_layer_norm_jvp(x, h, s, tx, th, ts), [2.0, 1.0, 0.5]),
        "layer_norm": (
            ops.layer_norm, ref_layer_norm, [(2, 3, C), (C,), (C,)],
            lambda x, w, b, tx, tw, tb: ops.layer_norm_jvp(x, w, b, tx, tw, tb), [2.0, 1.0, 0.5]),
        "rms_norm": (
            ops.rms_norm, ref_rms_norm, [(2, 2, 3, C), (C,)],
            lambda x, w, tx, tw: ops.rms_norm_jvp(x, w, tx, tw), [1.0, 1.0]),
        "gelu_tanh": (
            ops.gelu_tanh, ref_gelu_tanh, [(2, 3, C), (C,)],
            lambda x, b, tx, tb: ops.gelu_tanh_jvp(x, b, tx, tb), [2.0, 0.5]),
        "gated_residual": (
            ops.gated_residual, ref_gated_residual, [(2, 3, C), (2, 1, C), (2, 3, C)],
            lambda x, g, y, tx, tg, ty: ops.gated_residual_jvp(x, g, y, tx, tg, ty), [1.0, 1.0, 1.0]),
        "linear": (
            ops.linear, ref_linear, [(2, 3, C), (24, C), (24,)],
            lambda x, w, b, tx, tw, tb: ops.linear_jvp(x, w, b, tx, tw, tb), [1.0, C ** -0.5, 1.0]),
    }


OPS = list(_cases(8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", SIZES)
@pytest.mark.parametrize("name", OPS)
def test_op_against_float64_reference(name, C, dtype, backend):
    op, ref, shapes, explicit, scales = _cases(C)[name]
    prim, tang = make_inputs(shapes, dtype, seed=C, scale=scales)
    with use_backend(backend):
        assert ops.resolve_backend(name, prim[0]) == backend
        check_op(op, ref, prim, tang, dtype, explicit_jvp=explicit)


BROADCAST = [
    ("modulated_layer_norm", [(2, 5, 72), (72,), (72,)]),
    ("modulated_layer_norm", [(2, 5, 72), (1, 5, 72), (2, 1, 72)]),  # (1, N, C): expanded, summed back
    ("modulated_layer_norm", [(2, 5, 72), (2, 5, 72), (5, 72)]),
    ("modulated_layer_norm", [(3, 2, 4, 37), (3, 1, 1, 37), (3, 2, 1, 37)]),
    ("modulated_layer_norm", [(2, 5, 37), (2, 5, 1), (2, 1, 37)]),  # trailing 1: one shift per row
    ("gated_residual", [(2, 5, 72), (72,), (2, 5, 72)]),
    ("gated_residual", [(2, 5, 72), (1, 5, 72), (2, 5, 72)]),
    ("gated_residual", [(4, 6, 37), (4, 1, 37), (4, 6, 37)]),
    ("modulated_layer_norm", [(2, 5, 37), (), (1,)]),  # 0-d and one-element operands broadcast as in PyTorch
    ("gated_residual", [(2, 5, 37), (), (2, 5, 37)]),
]


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,shapes", BROADCAST, ids=lambda v: str(v).replace(" ", ""))
def test_broadcast_shapes(name, shapes, dtype, backend):
    op, ref, _, _, _ = _cases(8)[name]
    prim, tang = make_inputs(shapes, dtype, seed=7)
    with use_backend(backend):
        check_op(op, ref, prim, tang, dtype)


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optional_operands_absent(backend, dtype):
    """rms_norm without weight, gelu without bias, linear without bias, layer_norm without weight and / or
    bias."""
    with use_backend(backend):
        prim, tang = make_inputs([(3, 4, 72)], dtype, seed=3)
        check_op(lambda x: ops.rms_norm(x), lambda x: ref_rms_norm(x), prim, tang, dtype,
                 explicit_jvp=lambda x, tx: ops.rms_norm_jvp(x, None, tx))
        check_op(lambda x: ops.layer_norm(x), lambda x: ref_layer_norm(x), prim, tang, dtype,
                 explicit_jvp=lambda x, tx: ops.layer_norm_jvp(x, None, None, tx))
        prim2, tang2 = make_inputs([(3, 4, 72), (72,)], dtype, seed=5)
        check_op(lambda x, w: ops.layer_norm(x, w), lambda x, w: ref_layer_norm(x, w), prim2, tang2, dtype,
                 explicit_jvp=lambda x, w, tx, tw: ops.layer_norm_jvp(x, w, None, tx, tw))
        check_op(lambda x, b: ops.layer_norm(x, None, b), lambda x, b: ref_layer_norm(x, None, b), prim2, tang2,
                 dtype, explicit_jvp=lambda x, b, tx, tb: ops.layer_norm_jvp(x, None, b, tx, None, tb))
        check_op(lambda x: ops.gelu_tanh(x), lambda x: ref_gelu_tanh(x), prim, tang, dtype,
                 explicit_jvp=lambda x, tx: ops.gelu_tanh_jvp(x, None, tx))
        prim, tang = make_inputs([(3, 4, 72), (16, 72)], dtype, seed=4, scale=[1.0, 0.1])
        check_op(lambda x, w: ops.linear(x, w), lambda x, w: ref_linear(x, w), prim, tang, dtype)


@pytest.mark.parametrize("backend", ["torch", "extension", "naive"])
def test_float64_is_exact_and_routes_to_pytorch(backend):
    prim, tang = make_inputs([(2, 3, 37), (2, 1, 37), (2, 1, 37)], torch.float64, seed=1)
    with use_backend("auto"):
        assert ops.resolve_backend("modulated_layer_norm", prim[0]) == "torch"
    if backend == "extension":
        with use_backend("extension"), pytest.raises(Exception, match="float64"):
            ops.modulated_layer_norm(*prim)
        return
    with use_backend(backend):
        check_op(ops.modulated_layer_norm, ref_modulated_layer_norm, prim, tang, torch.float64)


@pytest.mark.parametrize("backend, dtype", [("naive", torch.float64), ("torch", torch.float64),
                                            ("extension", torch.float32)])
def test_loss_on_the_tangent_alone_leaves_operands_it_does_not_reach_without_gradient(backend, dtype):
    """ty of modulated_layer_norm does not depend on the shift, nor ty of linear on the bias: a loss on ty
    alone gives them no gradient (None, .grad stays None, so an optimizer skips them), as torch's ops do."""
    g = torch.Generator().manual_seed(0)
    x, tx = (torch.randn(2, 3, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    shift, scale = (torch.randn(2, 1, 8, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
                    for _ in range(2))
    w, b = torch.randn(5, 8, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype, requires_grad=True)
    with use_backend(backend):
        _, ty = torch.func.jvp(lambda a: ops.modulated_layer_norm(a, shift, scale), (x,), (tx,))
        assert torch.autograd.grad(ty.square().sum(), (shift, scale), allow_unused=True)[0] is None
        _, ty = torch.func.jvp(lambda a: ops.linear(a, w, b), (x,), (tx,))
        ty.square().sum().backward()
    assert b.grad is None and w.grad is not None
