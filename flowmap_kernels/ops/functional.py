"""Public DiT primitives: forward, backward, JVP and backward through the JVP, with backend dispatch.

Every function checks its arguments (errors name the argument), then asks its registry once which backend
runs (``registry.resolve``): "naive" runs the plain PyTorch formula, "torch" / "extension" run the fused
autograd.Functions. ``<op>_jvp`` returns ``(y, ty)`` from one fused pass, differentiable in every primal and
tangent input. Shapes: ``x`` (..., C); per-channel operands broadcast to ``x`` (e.g. (B, 1, C) against
(B, N, C)); dtypes float16/bfloat16/float32 (fp32 accumulation) and float64.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import naive
from ._shapes import ModSpec, check_broadcast, check_tangent, check_tensor, chunk_rows
from .autograd import (GatedCompiledFunction, GatedFunction, GatedJVPFunction, GeluCompiledFunction, GeluFunction,
                       GeluJVPFunction, LinearCompiledFunction, LinearFunction, LinearJVPFunction, NormCfg,
                       NormCompiledFunction, NormFunction, NormJVPFunction, RowCfg, _zeros_if_none)
from .registry import GATED_RESIDUAL, GELU_TANH, LINEAR, MODULATED_LAYER_NORM, RMS_NORM, REGISTRIES


def _compiled_forward_mode() -> bool:
    """Forward-mode AD inside a region that torch.compile traces: Dynamo differentiates the traced ops with its
    own formulas (never the Functions' jvp rules), so the primal ops run their naive formulas (exact
    tangents). The explicit ``*_jvp`` forms have no such limit (flowmap_kernels.func.jvp uses them)."""
    from ..func import forward_mode_active
    return torch.compiler.is_compiling() and forward_mode_active()


def _primal(fn, compiled_fn):
    """The primal Function: its jvp-less twin while torch.compile traces (Dynamo refuses custom jvp rules)."""
    return compiled_fn if torch.compiler.is_compiling() else fn


def _impl(reg, name):
    return reg.impls[name].impl


def _rpc(reg, name, x, specs) -> int:
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    groups = [R // s.rows for s in specs if s is not None and s.rows]
    if not groups:
        return 1
    n_groups = min(s.rows for s in specs if s is not None and s.rows)
    return chunk_rows(groups, _impl(reg, name).chunk_target(R, x.device, n_groups))


def _unpack(t):
    return (None, None) if t is None else tuple(fwAD.unpack_dual(t))


def _split_duals(*ts):
    """Primals and forward-AD tangents of the inputs (tangents None when no input carries one)."""
    pairs = [_unpack(t) for t in ts]
    tangents = [t for _, t in pairs]
    return [p for p, _ in pairs], (tangents if any(t is not None for t in tangents) else None)


def _eps(eps) -> float:
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    return float(eps)


# ---- modulated LayerNorm -----------------------------------------------------------------------------

def _check_channels(x) -> None:
    if x.dim() >= 1 and x.shape[-1] == 0:
        raise ValueError(f"x: the normalized (last) dim has size 0 (shape {tuple(x.shape)}); expected at least "
                         f"one channel")


def _mln_cfg(x, shift, scale, eps, name):
    check_tensor("x", x)
    _check_channels(x)
    check_tensor("shift", shift, ref=x)
    check_tensor("scale", scale, ref=x)
    check_broadcast("shift", shift, x)
    check_broadcast("scale", scale, x)
    ss, hs = ModSpec.of(scale, x), ModSpec.of(shift, x)
    R = x.numel() // x.shape[-1]
    return NormCfg(True, 1.0, _eps(eps), ss, hs, tuple(x.shape), R,
                   _rpc(MODULATED_LAYER_NORM, name, x, (ss, hs)), name)


def modulated_layer_norm(x, shift, scale, eps: float = 1e-6):
    """adaLN: LayerNorm of x over the last dim (no affine), then x_hat * (1 + scale) + shift.

    x (..., C); shift, scale broadcastable to x (e.g. (B, 1, C) against (B, N, C)); same dtype/device.
    """
    check_tensor("x", x)
    _check_channels(x)
    name = MODULATED_LAYER_NORM.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive" or _compiled_forward_mode():
        _mln_cfg(x, shift, scale, eps, "torch")
        return naive.modulated_layer_norm(x, shift, scale, eps)
    (xp, hp, sp), tans = _split_duals(x, shift, scale)
    cfg = _mln_cfg(xp, hp, sp, eps, name)
    if tans is not None:  # under forward AD: one fused forward+JVP pass (the primal is not computed twice)
        tx, th, ts = tans
        y, ty, _ = NormJVPFunction.apply(xp, _zeros_if_none(tx, xp), sp, hp, _zeros_if_none(ts, sp),
                                         _zeros_if_none(th, hp), cfg)
        return fwAD.make_dual(y, ty)
    return _primal(NormFunction, NormCompiledFunction).apply(x, scale, shift, cfg)[0]


def modulated_layer_norm_jvp(x, shift, scale, tx, tshift=None, tscale=None, eps: float = 1e-6):
    """(y, ty) of :func:`modulated_layer_norm` along (tx, tshift, tscale) (None = zero), in one pass.

    ty = txh (1 + scale) + xh tscale + tshift with txh = r (tx - mean(tx) - xh mean(xh tx)).
    """
    check_tensor("x", x)
    _check_channels(x)
    tx, tshift, tscale = (check_tangent(n, t, p) for n, t, p in
                          (("tx", tx, x), ("tshift", tshift, shift), ("tscale", tscale, scale)))
    name = MODULATED_LAYER_NORM.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive":
        _mln_cfg(x, shift, scale, eps, "torch")
        return naive.jvp_of(naive.modulated_layer_norm, (x, shift, scale), (tx, tshift, tscale), eps=eps)
    cfg = _mln_cfg(x, shift, scale, eps, name)
    y, ty, _ = NormJVPFunction.apply(x, _zeros_if_none(tx, x), scale, shift, _zeros_if_none(tscale, scale),
                                     _zeros_if_none(tshift, shift), cfg)
    return y, ty


# ---- RMSNorm -----------------------------------------------------------------------------------------

def _rms_cfg(x, weight, eps, name):
    check_tensor("x", x)
    _check_channels(x)
    spec = None
    if weight is not None:
        check_tensor("weight", weight, ref=x)
        if tuple(weight.shape) != (x.shape[-1],):
            raise ValueError(f"weight: expected shape ({x.shape[-1]},) (the last dim of x), got {tuple(weight.shape)}")
        spec = ModSpec.of(weight, x)
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return NormCfg(False, 0.0 if weight is not None else 1.0, _eps(eps), spec, None, tuple(x.shape), R,
                   _rpc(RMS_NORM, name, x, (spec,)), name)


def rms_norm(x, weight=None, eps: float = 1e-6):
    """RMSNorm (QK-norm): x * rsqrt(mean(x^2) + eps) * weight. x (..., C), weight (C,) or None."""
    check_tensor("x", x)
    _check_channels(x)
    name = RMS_NORM.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive" or _compiled_forward_mode():
        _rms_cfg(x, weight, eps, "torch")
        return naive.rms_norm(x, weight, eps)
    (xp, wp), tans = _split_duals(x, weight)
    cfg = _rms_cfg(xp, wp, eps, name)
    if tans is not None:
        tx, tw = tans
        y, ty, _ = NormJVPFunction.apply(xp, _zeros_if_none(tx, xp), wp, None, _zeros_if_none(tw, wp), None, cfg)
        return fwAD.make_dual(y, ty)
    return _primal(NormFunction, NormCompiledFunction).apply(x, weight, None, cfg)[0]


def rms_norm_jvp(x, weight, tx, tweight=None, eps: float = 1e-6):
    """(y, ty) of :func:`rms_norm` along (tx, tweight): ty = r (tx - xh mean(xh tx)) w + xh tw."""
    check_tensor("x", x)
    _check_channels(x)
    tx = check_tangent("tx", tx, x)
    if weight is None and tweight is not None:
        raise ValueError("tweight: given without a weight")
    tweight = check_tangent("tweight", tweight, weight) if weight is not None else None
    name = RMS_NORM.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive":
        _rms_cfg(x, weight, eps, "torch")
        return naive.jvp_of(naive.rms_norm, (x, weight), (tx, tweight), eps=eps)
    cfg = _rms_cfg(x, weight, eps, name)
    y, ty, _ = NormJVPFunction.apply(x, _zeros_if_none(tx, x), weight, None, _zeros_if_none(tweight, weight), None,
                                     cfg)
    return y, ty


# ---- GELU ----------------------------------------------------------------------------------------------

def _gelu_cfg(x, bias, name):
    check_tensor("x", x)
    spec = None
    if bias is not None:
        check_tensor("bias", bias, ref=x)
        if tuple(bias.shape) != (x.shape[-1],):
            raise ValueError(f"bias: expected shape ({x.shape[-1]},) (the last dim of x), got {tuple(bias.shape)}")
        spec = ModSpec.of(bias, x)
    R = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return RowCfg(spec, tuple(x.shape), R, _rpc(GELU_TANH, name, x, (spec,)), name)


def gelu_tanh(x, bias=None):
    """GELU with the tanh approximation of x (+ bias (C,), fused): 0.5 z (1 + tanh(sqrt(2/pi)(z + 0.044715 z^3)))."""
    check_tensor("x", x)
    name = GELU_TANH.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive" or _compiled_forward_mode():
        _gelu_cfg(x, bias, "torch")
        return naive.gelu_tanh(x, bias)
    (xp, bp), tans = _split_duals(x, bias)
    cfg = _gelu_cfg(xp, bp, name)
    if tans is not None:
        tx, tb = tans
        y, ty = GeluJVPFunction.apply(xp, _zeros_if_none(tx, xp), bp, _zeros_if_none(tb, bp), cfg)
        return fwAD.make_dual(y, ty)
    return _primal(GeluFunction, GeluCompiledFunction).apply(x, bias, cfg)


def gelu_tanh_jvp(x, bias, tx, tbias=None):
    """(y, ty) of :func:`gelu_tanh`: ty = gelu'(x + bias) (tx + tbias)."""
    check_tensor("x", x)
    tx = check_tangent("tx", tx, x)
    if bias is None and tbias is not None:
        raise ValueError("tbias: given without a bias")
    tbias = check_tangent("tbias", tbias, bias) if bias is not None else None
    name = GELU_TANH.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive":
        _gelu_cfg(x, bias, "torch")
        return naive.jvp_of(naive.gelu_tanh, (x, bias), (tx, tbias))
    cfg = _gelu_cfg(x, bias, name)
    return GeluJVPFunction.apply(x, _zeros_if_none(tx, x), bias, _zeros_if_none(tbias, bias), cfg)


# ---- gated residual ------------------------------------------------------------------------------------

def _gated_cfg(x, gate, y, name):
    check_tensor("x", x)
    check_tensor("gate", gate, ref=x)
    check_tensor("y", y, ref=x)
    if y.shape != x.shape:
        raise ValueError(f"y: expected x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_broadcast("gate", gate, x)
    spec = ModSpec.of(gate, x)
    R = x.numel() // x.shape[-1]
    return RowCfg(spec, tuple(x.shape), R, _rpc(GATED_RESIDUAL, name, x, (spec,)), name)


def gated_residual(x, gate, y):
    """x + gate * y: x, y (..., C); gate broadcastable to x (e.g. (B, 1, C))."""
    check_tensor("x", x)
    name = GATED_RESIDUAL.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive" or _compiled_forward_mode():
        _gated_cfg(x, gate, y, "torch")
        return naive.gated_residual(x, gate, y)
    (xp, gp, yp), tans = _split_duals(x, gate, y)
    cfg = _gated_cfg(xp, gp, yp, name)
    if tans is not None:
        tx, tg, ty = tans
        out, tout = GatedJVPFunction.apply(xp, _zeros_if_none(tx, xp), gp, _zeros_if_none(tg, gp), yp,
                                           _zeros_if_none(ty, yp), cfg)
        return fwAD.make_dual(out, tout)
    return _primal(GatedFunction, GatedCompiledFunction).apply(x, gate, y, cfg)


def gated_residual_jvp(x, gate, y, tx, tgate=None, ty=None):
    """(out, tout) = (x + gate y, tx + tgate y + gate ty)."""
    check_tensor("x", x)
    tx, tgate, ty = (check_tangent(n, t, p) for n, t, p in (("tx", tx, x), ("tgate", tgate, gate), ("ty", ty, y)))
    name = GATED_RESIDUAL.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive":
        _gated_cfg(x, gate, y, "torch")
        return naive.jvp_of(naive.gated_residual, (x, gate, y), (tx, tgate, ty))
    cfg = _gated_cfg(x, gate, y, name)
    return GatedJVPFunction.apply(x, _zeros_if_none(tx, x), gate, _zeros_if_none(tgate, gate), y,
                                  _zeros_if_none(ty, y), cfg)


# ---- linear --------------------------------------------------------------------------------------------

def _linear_check(x, weight, bias):
    check_tensor("x", x)
    check_tensor("weight", weight, ref=x, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ref=x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear(x, weight, bias=None):
    """x W^T + b: x (..., K), weight (N, K), bias (N,) or None.

    Under forward-mode AD (torch.func.jvp, forward_ad dual tensors) the primal and the tangent come from
    ONE product on the stacked [x; tx] (plus x tW^T only when the weight has a tangent): the inputs'
    tangents are unpacked here and the result re-packed, so the primal is not computed twice.
    """
    _linear_check(x, weight, bias)
    name = LINEAR.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive" or _compiled_forward_mode():
        return naive.linear(x, weight, bias)
    (xp, tx), (wp, tw), (bp, tb) = _unpack(x), _unpack(weight), _unpack(bias)
    if tx is None and tw is None and tb is None:
        return _primal(LinearFunction, LinearCompiledFunction).apply(x, weight, bias, name)
    if tx is not None:
        y, ty = LinearJVPFunction.apply(xp, tx, wp, bp, tw, tb)
    else:  # weight / bias tangents only: no product with a zero tx
        y = F.linear(xp, wp, bp)
        ty = F.linear(xp, tw, tb) if tw is not None else tb.expand(y.shape)
    return fwAD.make_dual(y, ty)


def linear_jvp(x, weight, bias, tx, tweight=None, tbias=None):
    """(y, ty): y = x W^T + b, ty = tx W^T (+ x tW^T when tweight is given) (+ tb); [x; tx] share one product."""
    _linear_check(x, weight, bias)
    tx = check_tangent("tx", tx, x)
    tweight = check_tangent("tweight", tweight, weight)
    if bias is None and tbias is not None:
        raise ValueError("tbias: given without a bias")
    tbias = check_tangent("tbias", tbias, bias) if bias is not None else None
    name = LINEAR.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend
    if name == "naive":
        return naive.jvp_of(naive.linear, (x, weight, bias), (tx, tweight, tbias))
    return LinearJVPFunction.apply(x, _zeros_if_none(tx, x), weight, bias, tweight, tbias)


def resolve_backend(op: str, x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` ("modulated_layer_norm", "rms_norm", "gelu_tanh", "gated_residual",
    "linear") on tensors like ``x`` under ``backend`` (default: the one in force)."""
    return REGISTRIES[op].resolve(backend, device=x.device, dtype=x.dtype).backend
