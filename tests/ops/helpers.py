"""Float64 reference formulas of the DiT primitives (written here, independent of the package) and a
harness that checks primal, JVP in every input and gradients of a loss on (y, ty) for every input."""
from __future__ import annotations

import math

import torch

from tests.numerics import TOLERANCE, rel_err

EPS = 1e-6


def ref_modulated_layer_norm(x, shift, scale, eps=EPS):
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    return (x - m) / torch.sqrt(v + eps) * (1 + scale) + shift


def ref_layer_norm(x, weight=None, bias=None, eps=1e-5):
    m = x.mean(-1, keepdim=True)
    v = ((x - m) ** 2).mean(-1, keepdim=True)
    y = (x - m) / torch.sqrt(v + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


def ref_rms_norm(x, weight=None, eps=EPS):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight


def ref_gelu_tanh(x, bias=None):
    z = x if bias is None else x + bias
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


def ref_gated_residual(x, gate, y):
    return x + gate * y


def ref_linear(x, weight, bias=None):
    y = x @ weight.t()
    return y if bias is None else y + bias


def _z(g, like):
    return torch.zeros_like(like) if g is None else g


def jvp_and_grads(fn, primals, tangents, wy, wt):
    """(y, ty, grads of sum(y wy) + sum(ty wt) w.r.t. primals + tangents) through torch.func.jvp."""
    ps = [p.detach().clone().requires_grad_() for p in primals]
    ts = [t.detach().clone().requires_grad_() for t in tangents]
    y, ty = torch.func.jvp(fn, tuple(ps), tuple(ts))
    loss = (y.double() * wy).sum() + (ty.double() * wt).sum()
    grads = torch.autograd.grad(loss, ps + ts, allow_unused=True)
    return y.detach(), ty.detach(), [_z(g, v) for g, v in zip(grads, ps + ts)]


def make_inputs(shapes, dtype, seed=0, scale=None):
    """Random primals and tangents of the given shapes in ``dtype`` (values first drawn in float64)."""
    g = torch.Generator().manual_seed(seed)
    scale = scale or [1.0] * len(shapes)
    prim = [(torch.randn(s, generator=g, dtype=torch.float64) * c).to(dtype) for s, c in zip(shapes, scale)]
    tang = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    return prim, tang


def check_op(op, ref, primals, tangents, dtype, explicit_jvp=None):
    """Compare ``op`` (the package function) against ``ref`` (float64) in value, JVP along each input and
    along all of them, and the gradients of a loss on both outputs; returns the worst relative errors."""
    tol = TOLERANCE[dtype]
    p64 = [p.double() for p in primals]
    t64 = [t.double() for t in tangents]
    errs = {}
    y = op(*primals)
    assert y.dtype == dtype
    errs["y"] = rel_err(y, ref(*p64))
    # JVP along one input at a time
    for i in range(len(primals)):
        tz = [torch.zeros_like(t) for t in tangents]
        tz[i] = tangents[i]
        _, ty = torch.func.jvp(op, tuple(primals), tuple(tz))
        _, ty_ref = torch.func.jvp(ref, tuple(p64), tuple(t.double() for t in tz))
        errs[f"t{i}"] = rel_err(ty, ty_ref)
    g = torch.Generator().manual_seed(123)
    wy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wt = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y_ref, ty_ref, grads_ref = jvp_and_grads(ref, p64, t64, wy, wt)
    y_op, ty_op, grads_op = jvp_and_grads(op, primals, tangents, wy, wt)
    errs["ty"] = rel_err(ty_op, ty_ref)
    for k, (a, b) in enumerate(zip(grads_op, grads_ref)):
        assert a.shape == b.shape and a.dtype == dtype
        errs[f"grad{k}"] = rel_err(a, b)  # ||a|| where the reference gradient is zero
    if explicit_jvp is not None:
        ye, tye = explicit_jvp(*primals, *tangents)
        errs["explicit_y"], errs["explicit_ty"] = rel_err(ye, y_ref), rel_err(tye, ty_ref)
        ps = [p.detach().clone().requires_grad_() for p in primals]
        ts = [t.detach().clone().requires_grad_() for t in tangents]
        ye, tye = explicit_jvp(*ps, *ts)
        loss = (ye.double() * wy).sum() + (tye.double() * wt).sum()
        ge = torch.autograd.grad(loss, ps + ts, allow_unused=True)
        for k, (a, b) in enumerate(zip(ge, grads_ref)):
            a = _z(a, b.to(dtype))
            errs[f"explicit_grad{k}"] = rel_err(a, b)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors above {tol}: {bad}"
    return errs
