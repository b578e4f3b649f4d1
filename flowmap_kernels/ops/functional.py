"""Public DiT primitives: forward, backward, JVP and backward through the JVP, with backend dispatch.

Every function checks its arguments (errors name the argument), then asks its registry once which backend
runs (``registry.resolve``): "naive" runs the plain PyTorch formula, "torch" / "extension" run the fused
autograd.Functions. ``<op>_jvp`` returns ``(y, ty)`` from one fused pass, differentiable in every primal and
tangent input. Shapes: ``x`` (..., C); per-channel operands broadcast to ``x`` (e.g. (B, 1, C) against
(B, N, C)); dtypes float16/bfloat16/float32 (fp32 accumulation) and float64.

Float32 tangents: the ``*_jvp`` forms also take float32 tangents with float16/bfloat16 operands; then the op
runs in float32 and returns y in the operands' dtype (rounded once, at the output) and ty in float32, so a
chain of ops (the models' dual forms under ``flowmap_kernels.func.jvp(..., tangent_dtype=torch.float32)``)
never rounds a tangent to 16 bits. It costs what a float32 forward+JVP costs.

The row ops (modulated_layer_norm, rms_norm, gelu_tanh, gated_residual) are driven by one table of
:class:`_RowOp` entries and two drivers (:func:`_run`, :func:`_run_jvp`); linear, whose JVP stacks [x; tx]
and skips zero tangents, has its own pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .._autodiff import (apply_on_unpacked, autocast_cast, autocast_dtype, autocast_tangent, autocasts_to_float32,
                         float32_tangents, follows_autocast, for_compile, make_dual, unpack_duals, widened_jvp,
                         without_autocast, zeros_if_none)
from . import naive
from .autograd import (GatedCompiledFunction, GatedFunction, GatedJVPCompiledFunction, GatedJVPFunction,
                       GeluCompiledFunction, GeluFunction, GeluJVPCompiledFunction, GeluJVPFunction,
                       LinearCompiledFunction, LinearFunction, LinearJVPCompiledFunction, LinearJVPFunction,
                       NormCompiledFunction, NormFunction, NormJVPCompiledFunction, NormJVPFunction)
from .problem import (check_channels, check_linear, check_tangent, check_tensor, make_gated_residual_problem,
                      make_gelu_tanh_problem, make_layer_norm_problem, make_modulated_layer_norm_problem,
                      make_rms_norm_problem)
from .registry import GATED_RESIDUAL, GELU_TANH, LAYER_NORM, LINEAR, MODULATED_LAYER_NORM, RMS_NORM, REGISTRIES


def _compiled_forward_mode() -> bool:
    """Forward-mode AD inside a region that torch.compile traces: Dynamo differentiates the traced ops with its
    own formulas (never the Functions' jvp rules), so the primal ops run their naive formulas (exact
    tangents). The explicit ``*_jvp`` forms have no such limit (flowmap_kernels.func.jvp uses them)."""
    from ..func import forward_mode_active
    return torch.compiler.is_compiling() and forward_mode_active()


def _resolve(registry, x) -> str:
    return registry.resolve(None, device=x.device, dtype=x.dtype, numel=x.numel()).backend


def _check_tangents(operands, tangents, names) -> list:
    """Each tangent None or shaped like its operand; ``names``: (operand, tangent, optional) per operand (the
    tangent of an absent optional operand must be None)."""
    out = []
    for (pname, tname, optional), p, t in zip(names, operands, tangents):
        if optional and p is None:
            if t is not None:
                raise ValueError(f"{tname}: given without a {pname}")
            out.append(None)
        else:
            out.append(check_tangent(tname, t, p))
    return out


# ---- the row ops: one table, two drivers -----------------------------------------------------------------

@dataclass(frozen=True)
class _RowOp:
    """How a public row op maps onto its registry, naive formula, problem descriptor and Functions.

    ``compiled_*``: the Functions' jvp-less twins, applied while torch.compile traces (``for_compile``).
    ``operands``: (operand, tangent, optional) names in the public argument order (``x`` first);
    ``order(*operands)``: the primal Function's tensor arguments; ``jvp_order(operands, tangents)``: the
    JVP Function's; ``outputs``: how many leading outputs of the Functions are results (the rest: statistics).
    """
    registry: object
    naive: Callable
    make_problem: Callable  # (*operands, *options, registry, backend) -> problem descriptor
    function: type
    compiled_function: type
    jvp_function: type
    compiled_jvp_function: type
    operands: tuple
    order: Callable
    jvp_order: Callable
    check_x: Callable


def _check_norm_x(x) -> None:
    check_tensor("x", x)
    check_channels(x)


def _check_x(x) -> None:
    check_tensor("x", x)


_MODULATED_LAYER_NORM = _RowOp(
    MODULATED_LAYER_NORM, naive.modulated_layer_norm, make_modulated_layer_norm_problem, NormFunction,
    NormCompiledFunction, NormJVPFunction, NormJVPCompiledFunction,
    (("x", "tx", False), ("shift", "tshift", False), ("scale", "tscale", False)),
    order=lambda x, shift, scale: (x, scale, shift),
    jvp_order=lambda p, t: (p[0], t[0], p[2], p[1], t[2], t[1]), check_x=_check_norm_x)
_LAYER_NORM = _RowOp(
    LAYER_NORM, naive.layer_norm, make_layer_norm_problem, NormFunction, NormCompiledFunction, NormJVPFunction,
    NormJVPCompiledFunction, (("x", "tx", False), ("weight", "tweight", True), ("bias", "tbias", True)),
    order=lambda x, weight, bias: (x, weight, bias),
    jvp_order=lambda p, t: (p[0], t[0], p[1], p[2], t[1], t[2]), check_x=_check_norm_x)
_RMS_NORM = _RowOp(
    RMS_NORM, naive.rms_norm, make_rms_norm_problem, NormFunction, NormCompiledFunction, NormJVPFunction,
    NormJVPCompiledFunction, (("x", "tx", False), ("weight", "tweight", True)),
    order=lambda x, weight: (x, weight, None),
    jvp_order=lambda p, t: (p[0], t[0], p[1], None, t[1], None), check_x=_check_norm_x)
_GELU_TANH = _RowOp(
    GELU_TANH, naive.gelu_tanh, make_gelu_tanh_problem, GeluFunction, GeluCompiledFunction, GeluJVPFunction,
    GeluJVPCompiledFunction, (("x", "tx", False), ("bias", "tbias", True)),
    order=lambda x, bias: (x, bias),
    jvp_order=lambda p, t: (p[0], t[0], p[1], t[1]), check_x=_check_x)
_GATED_RESIDUAL = _RowOp(
    GATED_RESIDUAL, naive.gated_residual, make_gated_residual_problem, GatedFunction, GatedCompiledFunction,
    GatedJVPFunction, GatedJVPCompiledFunction, (("x", "tx", False), ("gate", "tgate", False), ("y", "ty", False)),
    order=lambda x, gate, y: (x, gate, y),
    jvp_order=lambda p, t: (p[0], t[0], p[1], t[1], p[2], t[2]), check_x=_check_x)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(op: _RowOp, operands: tuple, options: tuple = (), kwargs: Optional[dict] = None):
    """The primal op. Under forward AD (dual inputs) one fused forward+JVP pass (the primal is not computed
    twice) and a dual result. Inside ``torch.autocast`` the floating operands are cast to its dtype first."""
    x = operands[0]
    ac = autocast_dtype(x)
    if ac is not None:
        with without_autocast(x):
            return _run(op, tuple(autocast_cast(o, ac) for o in operands), options, kwargs)
    op.check_x(x)
    name = _resolve(op.registry, x)
    if name == "naive" or _compiled_forward_mode() or x.numel() == 0:  # (empty: nothing for a kernel to do)
        op.make_problem(*operands, *options, op.registry, "torch")
        return op.naive(*operands, **(kwargs or {}))
    primals, tangents = unpack_duals(*operands)
    problem = op.make_problem(*primals, *options, op.registry, name)
    if any(t is not None for t in tangents):
        tangents = [zeros_if_none(t, p) for t, p in zip(tangents, primals)]
        out = apply_on_unpacked(for_compile(op.jvp_function, op.compiled_jvp_function),
                                *op.jvp_order(primals, tangents), problem)
        return make_dual(out[0], out[1])
    return _first(for_compile(op.function, op.compiled_function).apply(*op.order(*operands), problem))


def _run_jvp(op: _RowOp, operands: tuple, tangents: tuple, options: tuple = (), kwargs: Optional[dict] = None):
    """(y, ty) of the op along ``tangents`` (None = zero), in one fused pass (under ``torch.autocast`` the
    operands cast to its dtype, each tangent with its operand)."""
    x = operands[0]
    ac = autocast_dtype(x)
    if ac is not None:
        with without_autocast(x):
            return _run_jvp(op, tuple(autocast_cast(o, ac) for o in operands),
                            tuple(autocast_tangent(t, o, ac) for t, o in zip(tangents, operands)), options, kwargs)
    op.check_x(x)
    tangents = _check_tangents(operands, tangents, op.operands)
    if float32_tangents(x, tangents):
        return widened_jvp(lambda p, t: _run_jvp(op, p, t, options, kwargs), operands, tangents)
    name = _resolve(op.registry, x)
    if name == "naive" or x.numel() == 0:
        op.make_problem(*operands, *options, op.registry, "torch")
        return naive.jvp_of(op.naive, operands, tangents, **(kwargs or {}))
    problem = op.make_problem(*operands, *options, op.registry, name)
    tangents = [zeros_if_none(t, p) for t, p in zip(tangents, operands)]
    out = for_compile(op.jvp_function, op.compiled_jvp_function).apply(*op.jvp_order(operands, tangents), problem)
    return out[0], out[1]


# ---- modulated LayerNorm -----------------------------------------------------------------------------

def modulated_layer_norm(x, shift, scale, eps: float = 1e-6):
    """adaLN: LayerNorm of x over the last dim (no affine), then x_hat * (1 + scale) + shift.

    x (..., C); shift, scale broadcastable to x (e.g. (B, 1, C) against (B, N, C)); same dtype/device.
    """
    return _run(_MODULATED_LAYER_NORM, (x, shift, scale), (eps,), {"eps": eps})


def modulated_layer_norm_jvp(x, shift, scale, tx, tshift=None, tscale=None, eps: float = 1e-6):
    """(y, ty) of :func:`modulated_layer_norm` along (tx, tshift, tscale) (None = zero), in one pass.

    ty = txh (1 + scale) + xh tscale + tshift with txh = r (tx - mean(tx) - xh mean(xh tx)).
    """
    return _run_jvp(_MODULATED_LAYER_NORM, (x, shift, scale), (tx, tshift, tscale), (eps,), {"eps": eps})


# ---- LayerNorm (affine) ---------------------------------------------------------------------------------

def _layer_norm_autocast(x, operands: tuple, tangents: tuple = ()):
    """(operands, tangents) as F.layer_norm runs them: inside ``torch.autocast`` on a device where PyTorch runs
    layer_norm in float32 (CUDA, not CPU) the floating ones cast to float32, else unchanged (never lowered to
    the autocast dtype; the op itself then runs with autocast disabled)."""
    if autocast_dtype(x) is None or not autocasts_to_float32("layer_norm", x.device.type):
        return operands, tangents
    return (tuple(autocast_cast(o, torch.float32) for o in operands),
            tuple(autocast_tangent(t, o, torch.float32) for t, o in zip(tangents, operands)))


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last dim: xh * weight + bias (each optional), xh = (x - mean) rsqrt(var + eps).

    x (..., C); weight, bias (C,) or None; x's dtype and device. Like F.layer_norm over one dim (flatten
    the normalised dims to use it over several), including its autocast policy (float32 inside CUDA
    autocast), but its forward-mode tangent is differentiable to every order: PyTorch 2.13's F.layer_norm
    treats the saved mean and rstd as constants in the derivative of its tangent, so a loss on the tangent
    (TVM, LSD) gets wrong gradients through it.
    """
    _check_norm_x(x)
    operands, _ = _layer_norm_autocast(x, (x, weight, bias))
    with without_autocast(x):
        return _run(_LAYER_NORM, operands, (eps,), {"eps": eps})


def layer_norm_jvp(x, weight, bias, tx, tweight=None, tbias=None, eps: float = 1e-5):
    """(y, ty) of :func:`layer_norm` along (tx, tweight, tbias) (None = zero), in one pass:
    ty = txh w + xh tw + tb with txh = r (tx - mean(tx) - xh mean(xh tx))."""
    _check_norm_x(x)
    operands, tangents = _layer_norm_autocast(x, (x, weight, bias), (tx, tweight, tbias))
    with without_autocast(x):
        return _run_jvp(_LAYER_NORM, operands, tangents, (eps,), {"eps": eps})


# ---- RMSNorm -----------------------------------------------------------------------------------------

def rms_norm(x, weight=None, eps: float = 1e-6):
    """RMSNorm (QK-norm): x * rsqrt(mean(x^2) + eps) * weight. x (..., C), weight (C,) or None."""
    return _run(_RMS_NORM, (x, weight), (eps,), {"eps": eps})


def rms_norm_jvp(x, weight, tx, tweight=None, eps: float = 1e-6):
    """(y, ty) of :func:`rms_norm` along (tx, tweight): ty = r (tx - xh mean(xh tx)) w + xh tw."""
    return _run_jvp(_RMS_NORM, (x, weight), (tx, tweight), (eps,), {"eps": eps})


# ---- GELU ----------------------------------------------------------------------------------------------

def gelu_tanh(x, bias=None):
    """GELU with the tanh approximation of x (+ bias (C,), fused): 0.5 z (1 + tanh(sqrt(2/pi)(z + 0.044715 z^3)))."""
    return _run(_GELU_TANH, (x, bias))


def gelu_tanh_jvp(x, bias, tx, tbias=None):
    """(y, ty) of :func:`gelu_tanh`: ty = gelu'(x + bias) (tx + tbias)."""
    return _run_jvp(_GELU_TANH, (x, bias), (tx, tbias))


# ---- gated residual ------------------------------------------------------------------------------------

def gated_residual(x, gate, y):
    """x + gate * y: x, y (..., C); gate broadcastable to x (e.g. (B, 1, C))."""
    return _run(_GATED_RESIDUAL, (x, gate, y))


def gated_residual_jvp(x, gate, y, tx, tgate=None, ty=None):
    """(out, tout) = (x + gate y, tx + tgate y + gate ty)."""
    return _run_jvp(_GATED_RESIDUAL, (x, gate, y), (tx, tgate, ty))


# ---- linear --------------------------------------------------------------------------------------------

_LINEAR_OPERANDS = (("x", "tx", False), ("weight", "tweight", False), ("bias", "tbias", True))


@follows_autocast("x", "weight", "bias")
def linear(x, weight, bias=None):
    """x W^T + b: x (..., K), weight (N, K), bias (N,) or None.

    Under forward-mode AD (torch.func.jvp, forward_ad dual tensors) the primal and the tangent come from
    ONE product on the stacked [x; tx] (plus x tW^T only when the weight has a tangent): the inputs'
    tangents are unpacked here and the result re-packed, so the primal is not computed twice (weight / bias
    tangents without an x tangent: torch's F.linear on the dual tensors). Inside
    ``torch.autocast`` the operands are cast to its dtype first, as F.linear's are.
    """
    check_linear(x, weight, bias)
    name = _resolve(LINEAR, x)
    if name == "naive" or _compiled_forward_mode():
        return naive.linear(x, weight, bias)
    (xp, wp, bp), (tx, tw, tb) = unpack_duals(x, weight, bias)
    if tx is None and tw is None and tb is None:
        return for_compile(LinearFunction, LinearCompiledFunction).apply(x, weight, bias, name)
    if tx is None:  # weight / bias tangents only: torch's own linear on the duals (no product with a zero tx)
        return F.linear(x, weight, bias)
    y, ty = apply_on_unpacked(for_compile(LinearJVPFunction, LinearJVPCompiledFunction), xp, tx, wp, bp, tw, tb)
    return make_dual(y, ty)


@follows_autocast("x", "weight", "bias", tangents=(("tx", "x"), ("tweight", "weight"), ("tbias", "bias")))
def linear_jvp(x, weight, bias, tx, tweight=None, tbias=None):
    """(y, ty): y = x W^T + b, ty = tx W^T (+ x tW^T when tweight is given) (+ tb); [x; tx] share one product.
    Under ``torch.autocast`` the operands are cast to its dtype, each tangent with its operand."""
    check_linear(x, weight, bias)
    tx, tweight, tbias = _check_tangents((x, weight, bias), (tx, tweight, tbias), _LINEAR_OPERANDS)
    if float32_tangents(x, (tx, tweight, tbias)):
        return widened_jvp(lambda p, t: linear_jvp(*p, *t), (x, weight, bias), (tx, tweight, tbias))
    name = _resolve(LINEAR, x)
    if name == "naive":
        return naive.jvp_of(naive.linear, (x, weight, bias), (tx, tweight, tbias))
    return for_compile(LinearJVPFunction, LinearJVPCompiledFunction).apply(x, zeros_if_none(tx, x), weight, bias,
                                                                           tweight, tbias)


def resolve_backend(op: str, x: torch.Tensor, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` ("modulated_layer_norm", "layer_norm", "rms_norm", "gelu_tanh",
    "gated_residual", "linear") on tensors like ``x`` under ``backend`` (default: the one in force)."""
    return REGISTRIES[op].resolve(backend, device=x.device, dtype=x.dtype).backend
