"""Zero-row inputs (an empty sub-batch) run every primitive, its JVP and backward; "auto" routes them to
the "torch" backend, whose result is simply empty."""
import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.backends import BackendUnavailableError
from flowmap_kernels.ops import gated_residual, gelu_tanh, linear, modulated_layer_norm, rms_norm
from flowmap_kernels.ops.registry import resolve

C = 32


@pytest.mark.parametrize("name, fn", [
    ("modulated_layer_norm", lambda x: modulated_layer_norm(x, torch.ones(0, 1, C), torch.ones(0, 1, C))),
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
