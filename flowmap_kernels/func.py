"""Forward-mode derivatives that torch.compile keeps fused: ``jvp`` with the models' dual form.

``jvp(f, primals, tangents)`` has torch.func.jvp's contract (returns ``(f(*primals), jvp)``) and uses the
*dual form* of ``f`` when it has one: ``f.forward_jvp(*primals, *tangents)`` returning ``(y, ty)``, built from
the explicit-tangent ops (``fk.attention_jvp``, ``ops.*_jvp``: one fused pass per op for the primal and the
tangent, differentiable in both). The package's modules (``nn.Linear``, ``nn.Attention``, ``DiTBlock``,
``FinalLayer``, ``TimestepEmbedder``, ``DiT``, ...) have one; ``bind(model, y=cond)``
fixes keyword arguments and keeps it. Anything else runs torch.func.jvp, with the same results.

Why: inside a region that torch.compile traces, Dynamo traces ``torch.func.jvp`` by differentiating the
traced forward with its own formulas and never calls an autograd.Function's jvp rule, so an opaque fused
kernel cannot get a tangent there (``fk.attention`` then falls back to the naive O(N^2) math and warns).
The dual form contains no forward-mode AD at all: the explicit-tangent ops are ordinary reverse-mode
autograd.Functions over custom ops, which Dynamo and AOTAutograd trace into one graph (fullgraph=True),
forward, JVP and the backward through the JVP included.

The dual form is NOT used (torch.func.jvp runs instead) when a forward-mode level is already active (an
outer torch.func.jvp or forward_ad: the explicit ops have no jvp rule of their own), or when the module, or
one of its submodules, has forward hooks (FSDP2's ``fully_shard``), a replaced ``forward`` (activation
checkpointing) or context parallelism: the dual form would bypass them.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ._autodiff import SIXTEEN_BIT_DTYPES, TANGENT_GRAD, tangent_dtype_allowed

__all__ = ["jvp", "bind", "Bound", "dual_form", "has_dual_form", "forward_mode_active"]


class Bound:
    """``model`` with keyword arguments fixed: ``Bound(model, y=c)(*xs) == model(*xs, y=c)``; its
    ``forward_jvp(*primals, *tangents)`` is ``model.forward_jvp(*primals, *tangents, y=c)`` when the model has
    a dual form (see :func:`dual_form`)."""

    def __init__(self, model: Callable, **kwargs: Any):
        if not callable(model):
            raise TypeError(f"model: expected a callable (an nn.Module), got {type(model).__name__}")
        self.model, self.kwargs = model, kwargs

    def __call__(self, *primals):
        return self.model(*primals, **self.kwargs)

    def __repr__(self) -> str:
        return f"Bound({type(self.model).__name__}, kwargs={sorted(self.kwargs)})"


def bind(model: Callable, **kwargs: Any) -> Bound:
    """``model`` with keyword arguments (e.g. ``y=cond``) fixed, keeping its dual form for :func:`jvp`."""
    return Bound(model, **kwargs)


@torch.compiler.assume_constant_result
def _forward_mode_active_at_trace() -> bool:
    """Run eagerly while Dynamo traces (a constant of the graph): the real functorch interpreter stack holds
    the Jvp level of a torch.func.jvp being traced. (Reading ``forward_ad._current_level`` in traced code
    is unreliable: Dynamo caches a module attribute's first read, so a read before the traced jvp entered
    its level, e.g. by an earlier primal call, is returned again inside it.)"""
    return _forward_mode_active_eager()


def _forward_mode_active_eager() -> bool:
    if fwAD._current_level >= 0:
        return True
    stack = torch._C._functorch.get_interpreter_stack() or ()
    return any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack)


def forward_mode_active() -> bool:
    """Whether a forward-mode AD level is active (torch.func.jvp, forward_ad.dual_level), also while
    torch.compile traces (where it is evaluated at trace time and baked into the graph)."""
    if torch.compiler.is_compiling():
        return _forward_mode_active_at_trace()
    return _forward_mode_active_eager()


# submodules that the dual forms read without calling (containers, embedding tables); a class of the package
# declares itself so with a class attribute ``dual_passive = True`` (nn.LabelTable)
_PASSIVE_MODULES = (nn.ModuleList, nn.ModuleDict, nn.Embedding)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def _defining_class(cls: type, name: str) -> Optional[type]:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, type(code)):
            names |= _code_names(const)
    return names


@functools.lru_cache(maxsize=None)
def _names_used_by(cls: type) -> frozenset:
    """Attribute names that the methods of ``cls`` (below nn.Module) mention: the submodules its forward and
    forward_jvp may call."""
    names = set()
    for c in cls.__mro__:
        if c in (nn.Module, object):
            continue
        for member in c.__dict__.values():
            fn = getattr(member, "__func__", member)
            if callable(fn) and hasattr(fn, "__code__"):
                names |= _code_names(fn.__code__)
    return frozenset(names)


def _forward_matches_dual(sub: nn.Module) -> bool:
    """``sub`` has a forward_jvp written with its forward (not a forward overridden in a subclass below it), or
    is one of the passive modules the dual forms read without calling, exactly (a swapped-in module of
    another type, e.g. a LoRA or quantised Linear, has no dual form here)."""
    cls = type(sub)
    if not callable(getattr(sub, "forward_jvp", None)):
        return cls in _PASSIVE_MODULES or cls.__dict__.get("dual_passive", False)
    fwd, dual = _defining_class(cls, "forward"), _defining_class(cls, "forward_jvp")
    return fwd is not None and dual is not None and issubclass(dual, fwd)


def _dual_tree_intact(module: nn.Module) -> bool:
    """Every submodule that ``module``'s dual form may call (named in its class's methods, or held in a
    container it calls) keeps a matching dual form; submodules it never mentions (a loss weight attached to
    the model, say) are not its concern."""
    if not _forward_matches_dual(module):
        return False
    used = _names_used_by(type(module))
    for name, child in module.named_children():
        if isinstance(module, _CONTAINERS) or name in used:
            if not _dual_tree_intact(child):
                return False
    return True


def _module_supports_dual(module: nn.Module) -> bool:
    """No hook, replaced or overridden forward, swapped-in submodule or context parallelism anywhere in
    ``module``: forward_jvp computes what ``module(...)`` does."""
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return False
    for sub in module.modules():
        if sub._forward_hooks or sub._forward_pre_hooks or "forward" in sub.__dict__:
            return False
        if getattr(sub, "context_parallel_config", None) is not None:
            return False
    return _dual_tree_intact(module)


def dual_form(f: Callable) -> Optional[Callable]:
    """The callable ``(*primals, *tangents) -> (y, ty)`` that :func:`jvp` would use for ``f``, or None
    (torch.func.jvp runs)."""
    if forward_mode_active():  # nested in an outer forward-mode transform: the explicit ops have no jvp rule
        return None
    target, kwargs = (f.model, f.kwargs) if isinstance(f, Bound) else (f, {})
    method = getattr(target, "forward_jvp", None)
    if method is None or not callable(method):
        return None
    if isinstance(target, torch._dynamo.eval_frame.OptimizedModule):
        return None  # torch.compile'd module: its compiled forward is what the caller asked for
    if isinstance(target, nn.Module) and not _module_supports_dual(target):
        return None
    if not kwargs:
        return method
    if not torch.compiler.is_compiling():
        try:  # a keyword that only forward takes (e.g. aux=): torch.func.jvp of the forward
            inspect.signature(method).bind_partial(**kwargs)
        except TypeError:
            return None
    return lambda *args: method(*args, **kwargs)


def has_dual_form(f: Callable) -> bool:
    """Whether :func:`jvp` runs ``f``'s dual form (no forward-mode AD; compiles with the fused kernels)."""
    return dual_form(f) is not None


def _as_tuple(name: str, x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if not isinstance(x, (tuple, list)):
        raise TypeError(f"{name}: expected a tuple of tensors, got {type(x).__name__}")
    return tuple(x)


def jvp(f: Callable, primals, tangents, *, tangent_grad: bool = True, tangent_dtype: Optional[torch.dtype] = None):
    """``(f(*primals), J_f(primals) @ tangents)``, as torch.func.jvp, through ``f``'s dual form when it has one.

    f: an nn.Module with ``forward_jvp`` (the package's models), ``bind(model, **kwargs)`` of one, or any
    callable (then torch.func.jvp). primals, tangents: tuples of tensors, each tangent of its primal's shape
    (and dtype). Both outputs are differentiable (backward through the JVP, as TVM needs: on the torch.func.jvp
    path F.layer_norm runs under ``patch_layer_norm()``, whose tangent has exact derivatives); with
    ``tangent_grad=False`` the JVP comes back detached (a stop-gradient, as MeanFlow and sCM use) and, in the
    dual form, every fused op's backward takes its primal path: no backward through the tangent is traced,
    also under torch.compile (where a later ``.detach()`` cannot be seen by the ops' backward).

    ``tangent_dtype=torch.float32`` (dual forms only) carries the tangents of float16/bfloat16 primals in
    float32 through the model (given in the primal's dtype or in float32): every fused op and attention
    then runs in float32 with its primal output rounded back to 16 bits, and the JVP comes back in float32,
    never rounded to 16 bits on the way (about the cost of a float32 forward+JVP).
    """
    if not isinstance(tangent_grad, bool):
        raise TypeError(f"tangent_grad: expected a bool, got {type(tangent_grad).__name__}")
    if tangent_dtype not in (None, torch.float32):
        raise ValueError(f"tangent_dtype: expected None (the primals' dtypes) or torch.float32, got {tangent_dtype!r}")
    primals, tangents = _as_tuple("primals", primals), _as_tuple("tangents", tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"tangents: expected {len(primals)} tangents (one per primal), got {len(tangents)}")
    for i, (p, t) in enumerate(zip(primals, tangents)):
        if not isinstance(p, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise TypeError(f"primals/tangents: entry {i} is not a pair of tensors "
                            f"({type(p).__name__}, {type(t).__name__})")
        if p.shape != t.shape:
            raise ValueError(f"tangents: entry {i} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")
        if p.dtype != t.dtype and not (tangent_dtype is not None and tangent_dtype_allowed(t.dtype, p.dtype)):
            hint = " (float32 tangents of 16-bit primals: tangent_dtype=torch.float32)" \
                if p.dtype in SIXTEEN_BIT_DTYPES and t.dtype == torch.float32 else ""
            raise ValueError(f"tangents: entry {i} has dtype {t.dtype}, its primal {p.dtype}{hint}")
    dual = dual_form(f)
    if tangent_dtype is not None:
        if dual is None:
            raise ValueError("tangent_dtype=torch.float32 needs a model with a dual form (forward_jvp: the "
                             "package's DiT and nn modules, without hooks or context parallelism); "
                             "torch.func.jvp carries tangents in their primals' dtypes")
        tangents = tuple(t.float() if p.dtype in SIXTEEN_BIT_DTYPES else t for p, t in zip(primals, tangents))
    if dual is None:
        with _exact_layer_norm(tangent_grad):
            y, ty = torch.func.jvp(f, primals, tangents)
        return (y, ty) if tangent_grad else (y, _detach(ty))
    if tangent_grad:
        return tuple(dual(*primals, *tangents))
    previous, TANGENT_GRAD.enabled = TANGENT_GRAD.enabled, False
    try:
        y, ty = dual(*primals, *tangents)
    finally:
        TANGENT_GRAD.enabled = previous
    return y, _detach(ty)


def _exact_layer_norm(tangent_grad: bool):
    """``patch_layer_norm()`` around torch.func.jvp when the JVP's gradient is wanted (eager only): PyTorch 2.13's
    nn.LayerNorm gives a loss on the tangent wrong gradients (see integrations.layer_norm_patch)."""
    if not tangent_grad or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    from .integrations.layer_norm_patch import patch_layer_norm
    return patch_layer_norm()


def _detach(t):
    """The JVP output detached, any pytree of tensors (torch.func.jvp returns f's output structure)."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda x: x.detach(), t)
