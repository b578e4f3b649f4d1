"""Zero-row inputs (an empty sub-batch) run every primitive, its JVP and backward; "auto" routes them to
the "torch" backend, whose result is simply empty."""
import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.backends import BackendUnavailableError
from flowmap_kernels.ops import gated_residual, gelu_tanh, layer_norm, linear, modulated_layer_norm, rms_norm
from flowmap_kernels.ops.registry import resolve

C = 32


@pytest.mark.parametrize("name, fn", [
    ("modulated_layer_norm", lambda x: modulated_layer_norm(x, torch.ones(0, 1, C), torch.ones(0, 1, C))),
    ("layer_norm", lambda x: layer_norm(x, torch.ones(C), torch.zeros(C))),
    ("rms_norm", lambda x: rms_norm(x, torch.ones(C))),
    ("gelu_tanh", lambda x: gelu_tanh(x, torch.zeros(C))),
    ("gated_residual", lambda x: gated_residual(x, torch.ones(0, 1, C), x)),
    ("linear", lambda x: linear(x, torch.ones(8, C))),
])
def test_empty_batch(name, fn):
    x = torch.randn(0, 5, C, requires_grad=True)
    y, ty = torch.func.jvp(fn, (x,), (torch.randn_like(x),))
    (y.sum() + ty.square().sum()).backward()
    assert y.shape[0] == 0 and ty.shape == y.shape and x.grad.shape == x.shape
    if name != "linear":  # linear's "extension" entry is the stacked BLAS product, fine when empty
        assert resolve(name, x) == "torch"
        with pytest.raises(BackendUnavailableError, match="empty input"), fk.use_backend("extension"):
            fn(x)


@pytest.mark.parametrize("name, fn", [
    ("gelu_tanh", lambda x: gelu_tanh(x)),
    ("gated_residual", lambda x: gated_residual(x, torch.ones(2, 1, 0), x)),
])
def test_zero_channels_of_elementwise_ops_give_empty_results(name, fn):
    """gelu_tanh / gated_residual are elementwise: a last dim of size 0 is an empty input like any other
    (the norms, which divide by C, refuse it with a named error)."""
    x = torch.randn(2, 3, 0, requires_grad=True)
    y, ty = torch.func.jvp(fn, (x,), (torch.randn_like(x),))
    (y.sum() + ty.square().sum()).backward()
    assert y.shape == x.shape and ty.shape == x.shape and x.grad.shape == x.shape
    with pytest.raises(ValueError, match=r"gate: shape \(2, 5, 0\) is not broadcastable"):
        gated_residual(x, torch.ones(2, 5, 0), x)
    with pytest.raises(ValueError, match="expected at least one channel"):
        rms_norm(x)
    with pytest.raises(ValueError, match="expected at least one channel"):
        layer_norm(x)


@pytest.mark.parametrize("backend", ["torch", "extension", "naive"])
@pytest.mark.parametrize("x_shape, w_shape", [((2, 3, 0), (5, 0)), ((2, 3, 4), (0, 4)), ((0,), (5, 0))],
                         ids=["in_features_0", "out_features_0", "1d_in_features_0"])
def test_linear_with_zero_features_matches_f_linear(x_shape, w_shape, backend):
    """in_features or out_features 0 is F.linear's empty product (y = bias): primal, backward, torch.func.jvp and
    linear_jvp with the backward through the tangent, as F.linear (they divided by K / reshaped with -1)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in (x_shape, w_shape, w_shape[:1]))
    tx, tw, tb = (torch.randn(s, generator=g) for s in (x_shape, w_shape, w_shape[:1]))

    def run(fn):
        leaves = [a.clone().requires_grad_() for a in (x, w, b, tx, tw, tb)]
        y, ty = fn(*leaves)
        grads = torch.autograd.grad(y.sum() + ty.square().sum(), leaves, allow_unused=True)
        return y, ty, [torch.zeros_like(a) if gr is None else gr for gr, a in zip(grads, leaves)]

    with fk.use_backend(backend):
        outs = [run(lambda *a: torch.func.jvp(linear, tuple(a[:3]), tuple(a[3:]))),
                run(lambda *a: fk.ops.linear_jvp(*a))]
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        y = linear(*leaves)
        grads = torch.autograd.grad(y.square().sum(), leaves)
    want = run(lambda *a: torch.func.jvp(torch.nn.functional.linear, tuple(a[:3]), tuple(a[3:])))
    lv = [a.clone().requires_grad_() for a in (x, w, b)]
    want_grads = torch.autograd.grad(torch.nn.functional.linear(*lv).square().sum(), lv)
    for got in outs:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert all(torch.equal(a, r) for a, r in zip(got[2], want[2]))
    assert all(torch.equal(a, r) for a, r in zip(grads, want_grads))
