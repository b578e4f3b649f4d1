"""In-place ops on the primitives' outputs (``y = linear(x); y += r``, ``h.mul_(g)``) are allowed, as on torch's
own ops: plain, under torch.func.jvp and under forward_ad, then backward through primal and tangent. Each backend
gives what the naive one (plain PyTorch) gives."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowmap_kernels as fk
from flowmap_kernels.ops import gated_residual, gelu_tanh, layer_norm, linear, modulated_layer_norm, rms_norm

C = 8
OPS = {
    "modulated_layer_norm": lambda x, p: modulated_layer_norm(x, p["shift"], p["scale"]),
    "layer_norm": lambda x, p: layer_norm(x, p["weight"], p["bias"]),
    "rms_norm": lambda x, p: rms_norm(x, p["weight"]),
    "gelu_tanh": lambda x, p: gelu_tanh(x, p["weight"]),
    "gated_residual": lambda x, p: gated_residual(x, p["scale"], 2 * x),
    "linear": lambda x, p: linear(x, p["matrix"], p["weight"]),
}


def _run(op, mode, dtype):
    g = torch.Generator().manual_seed(0)
    x, tx = (torch.randn(2, 5, C, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    shapes = {"shift": (2, 1, C), "scale": (2, 1, C), "weight": (C,), "bias": (C,), "matrix": (C, C)}
    leaves = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
              for k, s in shapes.items()}
    xx = x.clone().requires_grad_()

    def f(a):
        y = OPS[op](a, leaves)
        y += 1.0
        y.mul_(a.detach().sign())
        return y

    if mode == "plain":
        out = f(xx)
        loss = out.square().sum()
    elif mode == "func.jvp":
        out, tout = torch.func.jvp(f, (xx,), (tx,))
        loss = out.square().sum() + tout.square().sum()
    else:
        with fwAD.dual_level():
            out, tout = fwAD.unpack_dual(f(fwAD.make_dual(xx, tx)))
            loss = out.square().sum() + tout.square().sum()
    used = [v for v in (xx, *leaves.values())]
    grads = torch.autograd.grad(loss, used, allow_unused=True)
    return [out.detach()] + [gr for gr in grads if gr is not None]


@pytest.mark.parametrize("mode", ["plain", "func.jvp", "forward_ad"])
@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("extension", torch.float32)])
@pytest.mark.parametrize("op", sorted(OPS))
def test_inplace_op_on_an_output_matches_naive(op, backend, dtype, mode):
    with fk.use_backend("naive"):
        want = _run(op, mode, torch.float64)
    with fk.use_backend(backend):
        got = _run(op, mode, dtype)
    assert len(got) == len(want)
    tol = 1e-12 if dtype == torch.float64 else 2e-4  # float32: ~1e-6 relative on gradients of order 1e2
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
