"""torch.func.vmap over the DiT primitives on every backend: vmap, jvp of vmap, vmap of jvp (jacfwd's
nesting), the explicit *_jvp forms, per-example gradients and autograd through the tangent, with some
operands vmapped and others shared; against the float64 formulas of tests/ops/helpers.py per example."""
import pytest
import torch
from torch.func import grad, jvp, vmap

import flowmap_kernels.ops as ops
from flowmap_kernels import use_backend
from tests.numerics import rel_err
from tests.ops.helpers import (make_inputs, ref_gated_residual, ref_gelu_tanh, ref_layer_norm, ref_linear,
                               ref_modulated_layer_norm, ref_rms_norm)

N, C = 3, 24
BACKENDS = ["torch", "extension", "naive"]
TOL = 1e-5  # float32 against float64 (the ops' own float32 tolerance)

# op name -> (op, explicit jvp, reference, per-example shapes, which operands are vmapped)
CASES = {
    "modulated_layer_norm": (ops.modulated_layer_norm, ops.modulated_layer_norm_jvp, ref_modulated_layer_norm,
                             [(2, 5, C), (2, 1, C), (2, 1, C)], (True, True, False)),
    "layer_norm": (ops.layer_norm, ops.layer_norm_jvp, ref_layer_norm, [(2, 5, C), (C,), (C,)], (True, False, True)),
    "rms_norm": (ops.rms_norm, ops.rms_norm_jvp, ref_rms_norm, [(2, 5, C), (C,)], (True, False)),
    "gelu_tanh": (ops.gelu_tanh, ops.gelu_tanh_jvp, ref_gelu_tanh, [(2, 5, C), (C,)], (True, True)),
    "gated_residual": (ops.gated_residual, ops.gated_residual_jvp, ref_gated_residual,
                       [(2, 5, C), (2, 1, C), (2, 5, C)], (True, False, True)),
    "linear": (ops.linear, ops.linear_jvp, ref_linear, [(2, 5, C), (7, C), (7,)], (True, False, True)),
}


def _inputs(shapes, batched, seed):
    """(primals, tangents, in_dims): vmapped operands with a leading dim of N, shared ones without."""
    full = [(N, *s) if b else s for s, b in zip(shapes, batched)]
    prim, tang = make_inputs(full, torch.float32, seed=seed)
    return prim, tang, tuple(0 if b else None for b in batched)


def _example(xs, dims, i):
    return [x if d is None else x[i] for x, d in zip(xs, dims)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_compositions_against_float64(name, backend):
    op, op_jvp, ref, shapes, batched = CASES[name]
    prim, tang, dims = _inputs(shapes, batched, seed=len(name))
    k = len(prim)
    with use_backend(backend):
        y = vmap(op, in_dims=dims)(*prim)
        y1, ty1 = jvp(lambda *p: vmap(op, in_dims=dims)(*p), tuple(prim), tuple(tang))
        y2, ty2 = vmap(lambda *a: jvp(op, tuple(a[:k]), tuple(a[k:])), in_dims=dims * 2)(*prim, *tang)
        y3, ty3 = vmap(op_jvp, in_dims=dims * 2)(*prim, *tang)
        leaves = [x.clone().requires_grad_(True) for x in (*prim, *tang)]
        yy, tt = jvp(lambda *p: vmap(op, in_dims=dims)(*p), tuple(leaves[:k]), tuple(leaves[k:]))
        grads = torch.autograd.grad((yy.double() * 0.5).sum() + tt.double().square().sum(), leaves)
        per_example = vmap(grad(lambda *p: op(*p).square().sum()), in_dims=dims)(*prim)
    for i in range(N):
        p64 = [x.double() for x in _example(prim, dims, i)]
        t64 = [x.double() for x in _example(tang, dims, i)]
        ry, rty = jvp(ref, tuple(p64), tuple(t64))
        for got in (y, y1, y2, y3):
            assert rel_err(got[i], ry) < TOL
        for got in (ty1, ty2, ty3):
            assert rel_err(got[i], rty) < TOL
        leaves64 = [x.clone().requires_grad_(True) for x in (*p64, *t64)]
        ry_, rty_ = jvp(ref, tuple(leaves64[:k]), tuple(leaves64[k:]))
        rg = torch.autograd.grad((ry_ * 0.5).sum() + rty_.square().sum(), leaves64)
        for gx, r, d in zip(grads, rg, dims * 2):
            if d is not None:
                assert rel_err(gx[i], r) < 10 * TOL
        pe = grad(lambda *p: ref(*p).square().sum())(*p64)
        assert rel_err(per_example[i], pe) < 10 * TOL
    # the gradient of a shared operand sums over the examples
    for j, d in enumerate(dims * 2):
        if d is None:
            total = 0
            for i in range(N):
                leaves64 = [x.double().clone().requires_grad_(True) for x in
                            (*_example(prim, dims, i), *_example(tang, dims, i))]
                ry_, rty_ = jvp(ref, tuple(leaves64[:k]), tuple(leaves64[k:]))
                total = total + torch.autograd.grad((ry_ * 0.5).sum() + rty_.square().sum(), leaves64[j])[0]
            assert rel_err(grads[j], total) < 10 * TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_vmap_over_an_empty_batch(name, backend):
    """vmap over a batch of size 0 (one call per example had no example to stack: IndexError) gives empty
    results and zero gradients for shared operands, as the naive ops under vmap do."""
    op, op_jvp, _, shapes, batched = CASES[name]
    dims = tuple(0 if b else None for b in batched)
    prim = [torch.randn((0, *s) if b else s).requires_grad_(True) for s, b in zip(shapes, batched)]
    tang = [torch.randn_like(p) for p in prim]
    k = len(prim)
    with use_backend("naive"):
        want = vmap(op, in_dims=dims)(*prim)
    with use_backend(backend):
        y = vmap(op, in_dims=dims)(*prim)
        y1, ty1 = jvp(lambda *p: vmap(op, in_dims=dims)(*p), tuple(prim), tuple(tang))
        y2, ty2 = vmap(lambda *a: jvp(op, tuple(a[:k]), tuple(a[k:])), in_dims=dims * 2)(*prim, *tang)
        y3, ty3 = vmap(op_jvp, in_dims=dims * 2)(*prim, *tang)
        grads = torch.autograd.grad(y.sum() + y1.sum() + ty1.square().sum() + ty3.sum(), prim)
        per_example = vmap(grad(lambda *p: op(*p).square().sum()), in_dims=dims)(*prim)
    for got in (y, y1, ty1, y2, ty2, y3, ty3):
        assert got.shape == want.shape and got.dtype == want.dtype
    assert per_example.shape == prim[0].shape
    for g, p in zip(grads, prim):
        assert g.shape == p.shape and not g.any()
