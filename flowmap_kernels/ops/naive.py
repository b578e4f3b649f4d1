"""The "naive" backend: each op as plain differentiable PyTorch ops (the reference).

Works natively under torch.func (jvp, grad, vmap) and autograd; the ``*_jvp`` forms run torch.func.jvp on
the plain formula. Computation happens in the input dtype, as an eager DiT would run it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_scale(x):
    """(..., 1): max|x| of each row where 1 < max|x| < inf, else 1; constant (detached).

    The norms divide each row by it before squaring ((x - mean)^2 overflows float32 for |x| > ~1.8e19):
    xh = xs_c rsqrt(mean(xs_c^2) + eps / a^2) with xs = x / a equals (x - mean) rsqrt(var + eps) for any a > 0,
    so its derivatives with respect to a vanish.
    """
    amax = x.detach().abs().amax(-1, keepdim=True)
    return torch.where((amax > 1) & torch.isfinite(amax), amax, torch.ones_like(amax))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last dim (then * weight + bias where given), from mean/var ops (rows scaled by
    _row_scale).

    Not F.layer_norm: in PyTorch 2.13 the derivative of F.layer_norm's forward-mode tangent is wrong
    (gradcheck of torch.func.jvp(F.layer_norm) fails in float64; see
    tests/ops/test_modes.py::test_pytorch_layer_norm_tangent_derivative_is_wrong), and in float32 it is wrong
    for rows with |x| > ~1e19 (NaN beyond ~1e30).
    """
    a = _row_scale(x)
    xs = x / a
    xc = xs - xs.mean(-1, keepdim=True)
    y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps / (a * a))
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def modulated_layer_norm(x, shift, scale, eps: float = 1e-6):
    """LayerNorm over the last dim (no affine), then x_hat * (1 + scale) + shift."""
    return layer_norm(x, eps=eps) * (1 + scale) + shift


def rms_norm(x, weight=None, eps: float = 1e-6):
    """x * rsqrt(mean(x^2) + eps) (* weight), on the row scaled by _row_scale."""
    a = _row_scale(x)
    xs = x / a
    y = xs * torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + eps / (a * a))
    return y if weight is None else y * weight


def gelu_tanh(x, bias=None):
    """GELU, tanh approximation, of x (+ bias)."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


def gated_residual(x, gate, y):
    """x + gate * y."""
    return x + gate * y


def linear(x, weight, bias=None):
    """x W^T (+ b)."""
    return F.linear(x, weight, bias)


def jvp_of(fn, primals, tangents, **kwargs):
    """(y, ty) = torch.func.jvp of ``fn`` (None primals stay None; None tangents are zero)."""
    idx = [i for i, p in enumerate(primals) if p is not None]

    def f(*args):
        full = list(primals)
        for i, a in zip(idx, args):
            full[i] = a
        return fn(*full, **kwargs)

    ps = tuple(primals[i] for i in idx)
    ts = tuple(torch.zeros_like(primals[i]) if tangents[i] is None else tangents[i] for i in idx)
    return torch.func.jvp(f, ps, ts)
