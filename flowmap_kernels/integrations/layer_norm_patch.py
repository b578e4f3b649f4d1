"""Route ``torch.nn.functional.layer_norm`` (and so every ``nn.LayerNorm``) to
:func:`flowmap_kernels.ops.layer_norm` while forward-mode AD is active.

Why: in PyTorch 2.13 the tangent that ``F.layer_norm`` gives under ``torch.func.jvp`` / ``forward_ad`` has
the right value, but its own derivative is wrong: autograd treats the saved mean and rstd as constants. A
loss on the tangent (TVM, LSD, the Lagrangian methods) therefore gets wrong gradients through every
LayerNorm of a model, and a JVP of the JVP is wrong too (pytorch/pytorch#196700). ``ops.layer_norm`` is the
same LayerNorm with a tangent differentiable to every order.

Outside forward mode the original runs untouched (same kernels, same values). Inside it, a call goes to
``ops.layer_norm`` (normalised shapes of several dims are flattened into one), with F.layer_norm's dtype
rules: 16-bit input with float32 weight and bias computes in float32 and returns the input's dtype, and
inside CUDA autocast everything runs in float32. Calls ``F.layer_norm`` itself rejects run the original
(which raises its own error); calls it accepts but ``ops.layer_norm`` cannot serve exactly (tensor
subclasses such as DTensor, nested tensors, dtypes other than float16 / bfloat16 / float32 / float64) run
the original with a :class:`LayerNormFallbackWarning`, once per reason. Only the attribute
``torch.nn.functional.layer_norm`` is replaced: a reference taken before the patch
(``from torch.nn.functional import layer_norm``) and ``torch.layer_norm`` are not routed.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function

from .._autodiff import autocast_dtype, autocasts_to_float32
from ..func import forward_mode_active
from ..ops import functional as _ops
from ._patching import FallbackLog, install_routers, is_patched, uninstall_routers

__all__ = ["patch_layer_norm", "install_layer_norm", "uninstall_layer_norm", "is_layer_norm_installed",
           "set_flowmap_layer_norm",
           "LayerNormFallbackWarning", "layer_norm", "layer_norm_fallback_counts", "reset_layer_norm_fallbacks"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INVALID = "invalid"  # a call F.layer_norm rejects: the original runs and raises its own error


class LayerNormFallbackWarning(UserWarning):
    """A call to the patched layer_norm under forward-mode AD ran the original function (once per reason)."""


_fallbacks = FallbackLog("layer_norm", LayerNormFallbackWarning,
                         "the derivative of the original's forward-mode tangent is wrong in PyTorch 2.13")


def _bind(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return input, normalized_shape, weight, bias, eps


def _shape(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(n) for n in normalized_shape)


def _unsupported(x, normalized_shape, weight, bias, eps):
    """None when ops.layer_norm serves the call exactly, _INVALID for a call F.layer_norm rejects, else
    (reason, message)."""
    tensors = [t for t in (x, weight, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return _INVALID
    try:
        shape = _shape(normalized_shape)
    except (TypeError, ValueError):
        return _INVALID
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape or any(
            tuple(t.shape) != shape for t in (weight, bias) if t is not None):
        return _INVALID
    if has_torch_function(tuple(tensors)):
        return "subclass", f"a tensor subclass with __torch_function__ ({type(tensors[0]).__name__})"
    if any(t.is_nested for t in tensors):
        return "nested", "nested tensors"
    if any(t.dtype not in _DTYPES for t in tensors):
        return "dtype", f"dtypes {sorted({str(t.dtype) for t in tensors})} (expected {[str(d) for d in _DTYPES]})"
    if any(t.device != x.device for t in tensors):
        return _INVALID
    params = [t.dtype for t in (weight, bias) if t is not None]
    if any(d != x.dtype for d in params) and not (
            x.dtype in (torch.float16, torch.bfloat16) and all(d == torch.float32 for d in params)):
        return _INVALID
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        return "eps", f"eps={eps!r} (expected a non-negative float)"
    if math.prod(shape) == 0:  # no element to normalise over: whatever the original does
        return _INVALID
    return None


def _exact(x, normalized_shape, weight, bias, eps):
    """ops.layer_norm over the trailing ``normalized_shape`` dims of x, with F.layer_norm's dtype rules."""
    shape = _shape(normalized_shape)
    C = math.prod(shape)
    rows = x.reshape(*x.shape[:x.dim() - len(shape)], C)
    w = None if weight is None else weight.reshape(C)
    b = None if bias is None else bias.reshape(C)
    fp32_autocast = autocast_dtype(x) is not None and autocasts_to_float32("layer_norm", x.device.type)
    mixed = any(t is not None and t.dtype != x.dtype for t in (w, b)) and not fp32_autocast
    y = _ops.layer_norm(rows.float() if mixed else rows, w, b, float(eps))
    return (y.to(x.dtype) if mixed else y).reshape(x.shape)


def _route(original, args: tuple, kwargs: dict):
    if not forward_mode_active():
        return original(*args, **kwargs)
    try:
        bound = _bind(*args, **kwargs)
    except TypeError:  # let the original raise its own error for a bad call
        return original(*args, **kwargs)
    why = _unsupported(*bound)
    if why == _INVALID:
        return original(*args, **kwargs)
    if why is not None:
        _fallbacks.note(*why)
        return original(*args, **kwargs)
    return _exact(*bound)


def _make_router(original):
    @functools.wraps(original)
    def layer_norm(*args, **kwargs):
        return _route(original, args, kwargs)

    layer_norm.__doc__ = ("flowmap_kernels' layer_norm: under forward-mode AD flowmap_kernels.ops.layer_norm (a "
                          "tangent differentiable to every order), else the original function.")
    layer_norm.__wrapped__ = original
    layer_norm._flowmap_router = True
    return layer_norm


#: The router as a plain function (the original is torch's F.layer_norm): use it without patching anything.
layer_norm = _make_router(F.layer_norm)

_TARGETS = ((F, "layer_norm"),)
_KIND = "layer_norm"


def install_layer_norm() -> None:
    """Route ``F.layer_norm`` as described above until the matching :func:`uninstall_layer_norm`
    (reference-counted, as :func:`flowmap_kernels.integrations.install`)."""
    install_routers(_TARGETS, _make_router, _KIND)


def uninstall_layer_norm() -> None:
    """Undo one :func:`install_layer_norm`; the last one restores the original function."""
    uninstall_routers(_TARGETS)


def is_layer_norm_installed() -> bool:
    return is_patched(F, "layer_norm")


def layer_norm_fallback_counts() -> dict:
    """{reason: number of forward-mode calls that ran the original function} since import or
    :func:`reset_layer_norm_fallbacks`."""
    return _fallbacks.counts()


def reset_layer_norm_fallbacks() -> None:
    _fallbacks.reset()


class patch_layer_norm(contextlib.ContextDecorator):
    """Context manager (and decorator): :func:`install_layer_norm` on entry, :func:`uninstall_layer_norm` on
    exit; nestable. Example (a TVM-style loss on the tangent of a model with ``nn.LayerNorm``)::

        with flowmap_kernels.integrations.patch_layer_norm(), flowmap_kernels.integrations.patch_sdpa():
            out, tangent = torch.func.jvp(model, (x, t), (v, torch.ones_like(t)))
            tangent.square().mean().backward()
    """

    def __enter__(self) -> "patch_layer_norm":
        install_layer_norm()
        return self

    def __exit__(self, *exc) -> None:
        uninstall_layer_norm()


def set_flowmap_layer_norm(model: torch.nn.Module) -> int:
    """Make every ``torch.nn.LayerNorm`` of ``model`` (that exact class; subclasses keep their own forward,
    for them use :class:`patch_layer_norm`) a :class:`flowmap_kernels.nn.LayerNorm`, in place: same
    parameters, state dict and values, exact derivative of the forward-mode tangent. Returns how many."""
    from ..nn.layers import LayerNorm
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for module in model.modules():
        if type(module) is torch.nn.LayerNorm:
            module.__class__ = LayerNorm
            n += 1
    return n
