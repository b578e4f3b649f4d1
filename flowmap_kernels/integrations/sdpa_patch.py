"""Route ``torch.nn.functional.scaled_dot_product_attention`` to :func:`flowmap_kernels.attention`.

Existing models (diffusers, timm, torch.nn.MultiheadAttention, your own) call SDPA, whose fused CPU/CUDA
kernels have no forward-mode AD formula: ``torch.func.jvp`` through them raises NotImplementedError.
Inside :func:`patch_sdpa` (or between :func:`install` and :func:`uninstall`) those calls run
``fk.attention`` instead: same result, plus JVP and backward through the tangent.

What is covered (one module attribute is replaced; every caller that looks the name up at call time
sees the replacement):

=======================================================================  ==========================
call site                                                                routed?
=======================================================================  ==========================
``F.scaled_dot_product_attention(...)`` (``import torch.nn.functional``)   yes
``torch.nn.functional.scaled_dot_product_attention(...)``                  yes
``nn.MultiheadAttention`` / ``F.multi_head_attention_forward`` (slow path) yes (looks the name up)
``torch._C._nn.scaled_dot_product_attention(...)``                         only with ``c_binding=True``
``from torch.nn.functional import scaled_dot_product_attention`` at import only for modules passed in
                                                                           ``modules=[...]``
a reference stored elsewhere (``self.fn = F.scaled_dot_product_attention``) no
``torch.ops.aten.scaled_dot_product_attention`` / ``aten::_scaled_dot_*``   no (below Python)
=======================================================================  ==========================

Calls the patch cannot serve exactly run the original function (never a different result) with a
:class:`SDPAFallbackWarning` once per reason: ``dropout_p > 0``, nested tensors, inputs with fewer than 2
dims, ``attn_mask`` together with ``is_causal``, unknown keyword arguments, and anything
:func:`flowmap_kernels.attention.make_problem` or the backend registry rejects (dtype, shapes, leading dims
that do not broadcast, an explicitly selected backend that cannot run the call). 2-d (tokens, dim) and 3-d
inputs (heads, tokens, dim), inputs with more than 4 dims and inputs with different numbers of dims are
served as ``fk.attention`` serves them (leading dims broadcast as in SDPA and flattened into the batch); so
are float masks that require grad (learned biases) or carry a forward-mode tangent, float32 masks with 16-bit
inputs, a batch of 1 in query or key / value and, without enable_gqa, a heads dim of 1 in any input (broadcast,
as SDPA) and, inside
``torch.autocast``, mixed input dtypes (cast to the autocast dtype, as SDPA's). The routing ignores
``torch.nn.attention.sdpa_kernel``: inside the patch every supported call goes to ``fk.attention``.

install/uninstall are reference-counted per target under one lock (nest freely, from any thread);
the last uninstall puts back the exact object that was there before the first install.

A loss on the tangent through ``nn.LayerNorm`` also needs :func:`.layer_norm_patch.patch_layer_norm`: the
derivative of F.layer_norm's forward-mode tangent is wrong in PyTorch 2.13.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from typing import Callable, Iterable, Union

import torch
import torch.nn.functional as F

from .._autodiff import autocast_cast, autocast_dtype
from ..attention import functional as _fk
from ..attention.problem import SDPAShapes, broadcast_batch, make_problem
from ..backends import BackendUnavailableError
from . import _patching
from ._patching import FallbackLog, install_routers, is_patched, patched_names, uninstall_routers

__all__ = [
    "patch_sdpa", "install", "uninstall", "is_installed", "scaled_dot_product_attention",
    "SDPAFallbackWarning", "fallback_counts", "reset_fallbacks",
]

#: The builtin SDPA as torch defines it (captured when this module is imported).
BUILTIN_SDPA = torch._C._nn.scaled_dot_product_attention

_local = threading.local()
_KIND = "sdpa"


class SDPAFallbackWarning(UserWarning):
    """A call to the patched scaled_dot_product_attention ran the original function (once per reason)."""


# ---------------------------------------------------------------------------------------------- routing

def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
          **extra):  # (scale and enable_gqa keyword-only, as in SDPA)
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra


#: make_problem errors that reject a call option rather than the inputs have their own fallback reason:
#: (argument the message starts with, text in the message, reason).
_OPTION_REASONS = (
    ("dropout_p", "", "dropout_p"),
    ("attn_mask", "is_causal", "attn_mask+is_causal"),
)


def _reason(error: Exception) -> str:
    """The fallback reason of an error from make_problem / the backend registry: an option's own name, else
    ``"<ErrorType>:<argument>"`` (their messages start with the argument they name)."""
    message = str(error)
    argument = message.split(":", 1)[0]
    for name, text, reason in _OPTION_REASONS:
        if argument == name and text in message:
            return reason
    return f"{type(error).__name__}:{argument}"


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra):
    """None when fk.attention serves the call exactly, else (reason key, message).

    The arguments are checked by :func:`flowmap_kernels.attention.make_problem` (what fk.attention itself
    runs) and the backend registry; before that only what the patch adds to fk.attention's contract: SDPA's
    keyword set, nested tensors, inputs of fewer than 2 dims and a mask's forward-mode tangent.
    """
    if extra:
        return "keywords", f"unknown keyword arguments {sorted(extra)}"
    named = (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask))
    for name, x in named:
        if isinstance(x, torch.Tensor) and x.is_nested:
            return "nested", f"{name} is a nested tensor"
    if all(isinstance(x, torch.Tensor) for x in (query, key, value)) and min(query.dim(), key.dim(),
                                                                             value.dim()) < 2:
        return "ndim", f"inputs must have at least 2 dims, got {query.dim()}, {key.dim()}, {value.dim()} dims"
    ac = autocast_dtype(query)
    if ac is not None:  # fk.attention casts as autocast casts SDPA's arguments
        query, key, value, attn_mask = (autocast_cast(x, ac) for x in (query, key, value, attn_mask))
    try:
        q, k, v, m = query, key, value, attn_mask
        shapes = SDPAShapes(query, key, value)
        if shapes.reshaped:
            (q, k, v), m = shapes.inputs(query, key, value), shapes.mask(attn_mask)
        (q, k, v), _ = broadcast_batch((q, k, v), enable_gqa=enable_gqa)
        p = make_problem(q, k, v, m, dropout_p, is_causal, scale, enable_gqa)
        _fk.resolve_backend(p)
    except (TypeError, ValueError, BackendUnavailableError) as e:
        return _reason(e), str(e)
    return None


_fallbacks = FallbackLog("scaled_dot_product_attention", SDPAFallbackWarning,
                         "forward-mode AD through the original may fail")


def _call_original(original: Callable, args, kwargs):
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        return original(*args, **kwargs)
    finally:
        _local.depth = depth


def _route(original: Callable, args: tuple, kwargs: dict):
    if getattr(_local, "depth", 0):
        # Re-entered from inside a fallback (the original is itself a wrapper that calls the patched
        # name again): run torch's builtin instead of looping.
        return BUILTIN_SDPA(*args, **kwargs)
    try:
        bound = _bind(*args, **kwargs)
    except TypeError:  # let the original raise its own error for a bad call
        return _call_original(original, args, kwargs)
    why = _unsupported(*bound)
    if why is not None:
        _fallbacks.note(*why)
        return _call_original(original, args, kwargs)
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _ = bound
    return _fk.attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)


def _make_router(original: Callable) -> Callable:
    @functools.wraps(BUILTIN_SDPA)
    def scaled_dot_product_attention(*args, **kwargs):
        return _route(original, args, kwargs)

    scaled_dot_product_attention.__doc__ = (
        "flowmap_kernels' scaled_dot_product_attention: fk.attention (forward-mode AD, backward through the "
        "tangent) where it serves the call exactly, else the original function (one warning per reason).")
    scaled_dot_product_attention.__wrapped__ = original
    scaled_dot_product_attention._flowmap_router = True
    return scaled_dot_product_attention


#: The router as a plain function (falls back to torch's builtin): use it without patching anything.
scaled_dot_product_attention = _make_router(BUILTIN_SDPA)


def fallback_counts() -> dict:
    """{reason: number of calls that ran the original function} since import or :func:`reset_fallbacks` (a call
    inside a torch.compile'd function counts once, when traced)."""
    return _fallbacks.counts()


def reset_fallbacks() -> None:
    """Clear the fallback counts and re-arm the once-per-reason warnings."""
    _fallbacks.reset()


# ------------------------------------------------------------------------------------------- patching

def _module(m: Union[str, types.ModuleType]) -> types.ModuleType:
    if isinstance(m, str):
        if m not in sys.modules:
            raise ValueError(f"modules: {m!r} is not imported")
        m = sys.modules[m]
    if not isinstance(m, types.ModuleType):
        raise TypeError(f"modules: expected modules or module names, got {type(m).__name__}")
    return m


def _targets(c_binding: bool, modules: Iterable, installing: bool) -> list:
    out = [(F, "scaled_dot_product_attention")]
    if c_binding:
        out.append((torch._C._nn, "scaled_dot_product_attention"))
    for m in modules:
        m = _module(m)
        patched = patched_names(m, _KIND)
        if installing:
            names = [n for n, v in vars(m).items() if v is BUILTIN_SDPA]
            names += [n for n in patched if n not in names]
        else:
            names = patched
        if not names:
            raise ValueError(
                f"modules: {m.__name__} has no global bound to torch.nn.functional.scaled_dot_product_attention")
        out += [(m, n) for n in names]
    return out


def install(*, c_binding: bool = False, modules: Iterable = ()) -> None:
    """Route SDPA calls to fk.attention until the matching :func:`uninstall` (reference-counted).

    ``c_binding``: also replace ``torch._C._nn.scaled_dot_product_attention``. ``modules``: modules (or
    names of imported modules) that bound the function at import (``from torch.nn.functional import
    scaled_dot_product_attention [as alias]``); each such global is replaced too.
    """
    with _patching.lock:
        install_routers(_targets(c_binding, modules, installing=True), _make_router, _KIND)


def uninstall(*, c_binding: bool = False, modules: Iterable = ()) -> None:
    """Undo one :func:`install` with the same arguments; the last one restores the original objects."""
    with _patching.lock:
        uninstall_routers(_targets(c_binding, modules, installing=False))


def is_installed() -> bool:
    """True while ``torch.nn.functional.scaled_dot_product_attention`` is routed by this module."""
    return is_patched(F, "scaled_dot_product_attention")


class patch_sdpa(contextlib.ContextDecorator):
    """Context manager (and decorator): :func:`install` on entry, :func:`uninstall` on exit.

    Re-entrant and nestable: ``with patch_sdpa(): with patch_sdpa(): ...`` counts; the same object may
    be entered several times. Example::

        with flowmap_kernels.patch_sdpa():
            out, tangent = torch.func.jvp(model, (x,), (tx,))
    """

    def __init__(self, *, c_binding: bool = False, modules: Iterable = ()):
        self.c_binding = bool(c_binding)
        self.modules = tuple(_module(m) for m in modules)

    def __enter__(self) -> "patch_sdpa":
        install(c_binding=self.c_binding, modules=self.modules)
        return self

    def __exit__(self, *exc) -> None:
        uninstall(c_binding=self.c_binding, modules=self.modules)
