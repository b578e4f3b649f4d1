"""Autodiff plumbing shared by the two op families (``attention/`` and ``ops/``).

``acc_dtype``               the accumulation dtype of the kernels: float64 for float64 inputs, else float32.
``zeros_if_none``           a missing tangent / cotangent (None) as zeros of its primal's shape.
``unpack_duals``            primals and forward-AD tangents of (possibly dual) inputs; ``make_dual`` repacks;
                            ``apply_on_unpacked`` / ``redual_saved``: a Function applied to them keeps
                            forward-over-reverse (autograd.grad with create_graph=True inside the dual level).
``triton_interpreter``      whether Triton runs its kernels in the CPU interpreter (TRITON_INTERPRET=1).
``no_tangent_grad``         a region whose explicit-tangent ops return tangents without gradient (the
                            caller stops the gradient of the JVP): their backward runs the primal kernels.
``differentiable_backward`` the one double-backward strategy: first-order gradients from fused backward
                            kernels, differentiable (create_graph=True, torch.func.grad over jvp, jacrev of
                            jacrev, forward-over-reverse) through a recomputation in the naive math that runs
                            only when a second derivative is actually taken.
``forward_over_forward``    the jvp rule of the explicit-tangent Functions (a JVP of a JVP: nested
                            torch.func.jvp, jacfwd of jacfwd), by the same naive recomputation
                            (``jvp_by_reverse``: J u in reverse mode only, valid inside a forward-AD level).
``without_jvp`` / ``for_compile``  jvp-less twins of Functions for regions that torch.compile traces.
``float32_tangents``        float32 tangents of float16/bfloat16 primals (``tangent_dtype_allowed``: the dtype
                            rule); ``widened_jvp`` runs an explicit JVP on them in float32 (y back in the
                            primals' dtype, ty float32).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD


def acc_dtype(x) -> torch.dtype:
    """The accumulation dtype for a tensor or dtype ``x``: float64 for float64, else float32."""
    dtype = x.dtype if isinstance(x, torch.Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeros_if_none(t: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t``, or zeros like ``like`` when ``t`` is None (None when ``like`` is None: an absent operand)."""
    if like is None:
        return None
    return torch.zeros_like(like) if t is None else t


def unpack_duals(*ts):
    """(primals, tangents): the forward-AD primal and tangent of each input (a tensor without a tangent, or
    anything that is not a tensor, comes back unchanged with tangent None).

    Inside torch.func.vmap under an outer jvp (jvp of vmap) a batched input's tangent lies below the batch
    level, where PyTorch cannot unpack it: if any input is batched, every input comes back as given with
    tangent None, so that the caller applies its primal autograd.Function, whose vmap and jvp rules carry
    all the tangents (unpacking only the shared inputs' would split them between two paths). The same when a
    tangent is batched by the legacy vmap (gradcheck's check_batched_forward_grad), which cannot repack a
    dual output (no batching rule for ``alias``)."""
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t) for t in ts):
        return list(ts), [None] * len(ts)
    pairs = [tuple(fwAD.unpack_dual(t)) if isinstance(t, torch.Tensor) else (t, None) for t in ts]
    if any(t is not None and torch._C._functorch.is_legacy_batchedtensor(t) for _, t in pairs):
        return list(ts), [None] * len(ts)
    return [p for p, _ in pairs], [t for _, t in pairs]


def make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """Repack an output and its tangent as a dual tensor of the current forward-AD level."""
    return fwAD.make_dual(primal, tangent)


_UNPACKED = threading.local()


class _DualLevel:
    """One entry into a forward-AD level: its index (PyTorch reuses indices) and a dual scalar made in it,
    whose tangent PyTorch clears when that level exits."""

    def __init__(self):
        self.index = fwAD._current_level
        self.sentinel = fwAD.make_dual(torch.zeros(()), torch.zeros(()))

    def active(self) -> bool:
        return self.index == fwAD._current_level and fwAD.unpack_dual(self.sentinel).tangent is not None


def _current_dual_level() -> Optional[_DualLevel]:
    """The forward_ad level entered by user code; None inside torch.func transforms (they enter levels of their
    own, whose tensors must not outlive them, and carry forward-over-reverse through the jvp rules)."""
    if fwAD._current_level < 0 or torch._C._functorch.get_interpreter_stack():
        return None
    level = getattr(_UNPACKED, "current", None)
    if level is None or not level.active():
        level = _UNPACKED.current = _DualLevel()
    return level


def concrete_int(n) -> int:
    """``n`` as a Python int. Under torch.compile with dynamic shapes a size may be symbolic, and a value that must
    be a trace-time constant (a backend choice) cannot take it: a bisection of comparisons, each of which Dynamo
    guards on, specialises the graph to its value (as a head dim does the kernels, which compile per head dim). A
    size, so in [0, 2**31]."""
    if not torch.compiler.is_compiling():  # (isinstance(n, torch.SymInt) is False while Dynamo traces)
        return int(n)
    lo, hi = 0, 1 << 31
    while lo < hi:
        mid = (lo + hi) // 2
        if n > mid:
            lo = mid + 1
        else:
            hi = mid
    return lo


def apply_on_unpacked(function: type, *args):
    """``function.apply(*args)`` for an explicit-tangent Function whose operands and tangents are the unpacked
    primals and tangents of dual inputs at the current forward-AD level; its setup_context records that level
    (:func:`record_tangent_output`) so that its backward can :func:`redual_saved`. Without grad mode, its
    forward alone (as torch's ops there, the outputs neither require grad nor are leaves, also when an operand
    requires grad inside torch.func.jvp)."""
    if not torch.is_grad_enabled():
        return function.forward(*args)
    if torch.compiler.is_compiling():
        return function.apply(*args)
    with on_unpacked_duals():
        return function.apply(*args)


@contextlib.contextmanager
def on_unpacked_duals() -> Iterator[None]:
    """Inside the block, explicit-tangent Functions are applied to the unpacked primals and tangents of dual inputs
    at the current forward-AD level (what :func:`apply_on_unpacked` says of one Function, for a composite such
    as context-parallel attention, whose Functions the block applies)."""
    previous = getattr(_UNPACKED, "level", None)
    _UNPACKED.level = _current_dual_level()
    try:
        yield
    finally:
        _UNPACKED.level = previous


def record_dual_level(ctx) -> None:
    """setup_context of an explicit-tangent Function: the forward-AD level whose duals it was applied to
    unpacked (:func:`apply_on_unpacked`), else None."""
    ctx.dual_level = getattr(_UNPACKED, "level", None)


def redual_saved(ctx, tensors: Sequence, pairs: Sequence[tuple]) -> tuple:
    """Forward-over-reverse (torch.autograd.grad(..., create_graph=True) inside the forward_ad level whose dual
    inputs were unpacked, e.g. a Hessian-vector product or gradcheck's check_fwd_over_rev): the saved operands
    ``tensors[i]`` as duals with their tangents ``tensors[j]`` for each (i, j) in ``pairs``, so that the
    gradients carry their tangents (by the backward Functions' jvp rules: the naive recomputation, as every
    second derivative here). Otherwise ``tensors`` unchanged: a backward without create_graph inside the level
    (a training step's loss.backward()), or in another level than the forward's, stays first order; its
    gradients carry no tangent."""
    level = getattr(ctx, "dual_level", None)
    if level is None or not torch.is_grad_enabled() or not level.active():
        return tuple(tensors)
    out = list(tensors)
    for i, j in pairs:
        if tensors[i] is not None and tensors[j] is not None:
            out[i] = fwAD.make_dual(tensors[i], tensors[j])
    return tuple(out)


def refuse_forward_over_reverse(ctx, message: str) -> None:
    """NotImplementedError(``message``) from the backward of an explicit-tangent Function that cannot do what
    :func:`redual_saved` does (a graph built inside the forward_ad level whose duals it was applied to): its
    gradients would silently carry no tangent."""
    level = getattr(ctx, "dual_level", None)
    if level is not None and torch.is_grad_enabled() and level.active():
        raise NotImplementedError(message)


class _TangentGrad(threading.local):
    """Whether explicit-tangent ops (attention_jvp, the ops' *_jvp) return a differentiable tangent, per thread
    (as the backend selection); read at call time, so under torch.compile it is a constant of the traced
    graph."""

    def __init__(self):
        self.enabled = True  # an instance attribute in every thread (Dynamo guards on the instance's dict)


TANGENT_GRAD = _TangentGrad()


def record_tangent_output(ctx, tangent: torch.Tensor) -> None:
    """setup_context of an explicit-tangent op: ``ctx.tangent_grad`` says whether its tangent output is
    differentiable; inside :func:`flowmap_kernels.func.jvp` with ``tangent_grad=False`` it is not (marked
    non-differentiable), and the op's backward takes the primal path (no backward through the tangent)."""
    ctx.tangent_grad = TANGENT_GRAD.enabled
    record_dual_level(ctx)
    if not ctx.tangent_grad:
        ctx.mark_non_differentiable(tangent)


def triton_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---- second derivatives through a naive recomputation ----------------------------------------------------

def _vjp_fn(outputs_fn, n: int, cotangents):
    """(first, given): first(*primals, *given cotangents) = vjp(outputs_fn) at the n primals, the missing
    cotangents taken as zeros; given = the indices of the cotangents that are not None."""
    given = [i for i, c in enumerate(cotangents) if c is not None]

    def first(*args):
        outs, pull = torch.func.vjp(outputs_fn, *args[:n])
        full = [torch.zeros_like(o) for o in outs]
        for i, c in zip(given, args[n:]):
            full[i] = c
        return pull(tuple(full))
    return first, given


def vjp_of_vjp(outputs_fn, primals, cotangents, grads_of_grads):
    """Gradients of <vjp(outputs_fn)(primals; cotangents), grads_of_grads> for primals and cotangents.

    ``outputs_fn`` returns a tuple. By torch.func.vjp (no requires_grad_ on the inputs), so that it runs inside
    torch.func transforms (jacrev of jacrev, vmap of grad) as well as under create_graph=True; None cotangents /
    grads are zero.
    """
    n = len(primals)
    first, given = _vjp_fn(outputs_fn, n, cotangents)
    _, pull_first = torch.func.vjp(first, *primals, *(cotangents[i] for i in given))
    second = pull_first(tuple(zeros_if_none(g, x) for x, g in zip(primals, grads_of_grads)))
    cot_grads = [None] * len(cotangents)
    for i, g in zip(given, second[n:]):
        cot_grads[i] = g
    return list(second[:n]), cot_grads


def jvp_by_reverse(fn, primals, tangents) -> tuple:
    """The derivative of ``fn(*primals)`` (a tensor or a tuple of them) along ``tangents``: J u, one entry per
    output. None primals are passed to ``fn`` as None; None tangents are zero.

    Computed in reverse mode only (the vjp of the linear map w -> J^T w is u -> J u), so that it also runs
    inside a forward-AD level (a custom Function's jvp rule), where a nested torch.func.jvp is not supported.
    """
    idx = [i for i, x in enumerate(primals) if x is not None]

    def present(*xs):
        full = list(primals)
        for i, x in zip(idx, xs):
            full[i] = x
        out = fn(*full)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    outs, pull = torch.func.vjp(present, *(primals[i] for i in idx))
    _, pull_transposed = torch.func.vjp(pull, tuple(torch.zeros_like(o) for o in outs))
    (ju,) = pull_transposed(tuple(zeros_if_none(tangents[i], primals[i]) for i in idx))
    return ju


def jvp_of_vjp(outputs_fn, primals, cotangents, primal_tangents, cotangent_tangents):
    """Forward-mode derivative of vjp(outputs_fn)(primals; cotangents) along the given tangents (None = zero),
    by :func:`jvp_by_reverse` (so that it also runs inside a forward-AD level)."""
    n = len(primals)
    first, given = _vjp_fn(outputs_fn, n, cotangents)
    return jvp_by_reverse(first, (*primals, *(cotangents[i] for i in given)),
                          (*primal_tangents, *(cotangent_tangents[i] for i in given)))


def forward_over_forward(naive_jvp, primals, tangents, differentiable) -> tuple:
    """The jvp rule of an explicit-tangent Function (inputs ``primals`` = its operands and their tangents,
    outputs (y, ty, statistics...)): the tangents of y and ty along ``tangents``, from ``naive_jvp(*primals)``
    -> (y, ty) in plain PyTorch. This is a JVP of a JVP (nested torch.func.jvp, jacfwd of jacfwd): second
    derivatives, through the naive recomputation that runs only when one is taken. ``differentiable``: whether
    ty is (not marked non-differentiable); the statistics outputs get no tangent."""
    ty_y, ty_ty = jvp_by_reverse(naive_jvp, primals, tangents)
    return ty_y, (ty_ty if differentiable else None)


def without_jvp(fn: type) -> type:
    """``fn`` with the same forward, setup_context and backward but no jvp rule (and no vmap rule: give it its
    own, applying the twin). Dynamo refuses to trace an autograd.Function that defines ``jvp`` when an input
    requires grad (graph break "Unsupported custom jvp"), so the ops apply these twins while
    ``torch.compiler.is_compiling()`` (:func:`for_compile`)."""
    return type(f"{fn.__name__}Compiled", (torch.autograd.Function,),
                {"__doc__": f"{fn.__name__} without its jvp rule (for regions that torch.compile traces).",
                 "forward": staticmethod(fn.forward), "setup_context": staticmethod(fn.setup_context),
                 "backward": staticmethod(fn.backward)})


def for_compile(fn: type, compiled_fn: type):
    """The Function to apply: its jvp-less twin while torch.compile traces (see :func:`without_jvp`), applied to
    distinct tensors (:class:`_DistinctInputs`)."""
    return _DistinctInputs(compiled_fn) if torch.compiler.is_compiling() else fn


class _DistinctInputs:
    """``function.apply`` with a tensor that is passed twice (``attention(x, x, x)``, one tensor as both shift and
    scale) replaced from its second use on by an alias: Dynamo refuses an autograd.Function that takes the same
    tensor twice (graph break "duplicate tensor input", an error under fullgraph=True); eager autograd does not
    care, and the alias's gradient reaches the tensor all the same."""

    def __init__(self, function: type):
        self.function = function

    def apply(self, *args):
        seen, distinct = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                if any(a is s for s in seen):
                    a = a.view_as(a)
                seen.append(a)
            distinct.append(a)
        return self.function.apply(*distinct)


@dataclass(frozen=True, eq=False)
class _BackwardRule:
    """What :class:`FusedBackward` needs besides tensors: the fused first-order pass, the naive function it
    differentiates, and how many of the tensor inputs are primals / cotangents (the rest: saved extras)."""
    fused: Callable
    naive: Callable
    n_primals: int
    n_cotangents: int
    n_tensors: int  # primals, cotangents and extras

    def naive_present(self, primals):
        """``naive`` as a function of the primals that are not None (the others stay None), returning a tuple."""
        idx = [i for i, p in enumerate(primals) if p is not None]

        def fn(*args):
            full = list(primals)
            for i, a in zip(idx, args):
                full[i] = a
            out = self.naive(*full)
            return out if isinstance(out, tuple) else (out,)
        return fn, idx


_SLOTS = 10  # tensor arguments of FusedBackward (Dynamo cannot trace an autograd.Function with *args)


def vmap_by_example(fn) -> staticmethod:
    """A ``vmap`` staticmethod for the autograd.Function ``fn``: one ``fn.apply`` per example (operands
    vmapped or shared, non-tensors passed as they are), outputs stacked at dim 0 (None stays None). Exact
    whatever ``fn`` computes; it costs a call per example."""
    def vmap(info, in_dims, *args):
        if info.batch_size == 0:  # no example: one on zeros (a.sum(d), still connected to a) gives the shapes
            out = fn.apply(*(a if d is None else a.sum(d) for a, d in zip(args, in_dims)))
            if not isinstance(out, tuple):
                return out.unsqueeze(0).narrow(0, 0, 0), 0
            empty = tuple(None if o is None else o.unsqueeze(0).narrow(0, 0, 0) for o in out)
            return empty, tuple(None if o is None else 0 for o in empty)
        outs = [fn.apply(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                for i in range(info.batch_size)]
        if not isinstance(outs[0], tuple):
            return torch.stack(outs), 0
        stacked = tuple(None if o is None else torch.stack([out[j] for out in outs]) for j, o in enumerate(outs[0]))
        return stacked, tuple(None if o is None else 0 for o in stacked)
    return staticmethod(vmap)


class FusedBackward(torch.autograd.Function):
    """Gradients of the primals = ``rule.fused(*primals, *cotangents, *extras)`` (fused kernels); itself
    differentiable in the primals and cotangents by the naive recomputation (``vjp_of_vjp`` / ``jvp_of_vjp``
    of ``rule.naive``), which runs only when a second derivative is taken. The tensors come in ``_SLOTS``
    fixed arguments, the unused ones None."""

    @staticmethod
    def forward(rule: _BackwardRule, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9):
        return tuple(rule.fused(*(t0, t1, t2, t3, t4, t5, t6, t7, t8, t9)[:rule.n_tensors]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        rule = inputs[0]
        ctx.rule = rule
        n = rule.n_primals + rule.n_cotangents
        ctx.save_for_backward(*inputs[1:1 + n])
        ctx.save_for_forward(*inputs[1:1 + n])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, *ggrads):
        rule = ctx.rule
        saved = ctx.saved_tensors
        primals, cots = saved[:rule.n_primals], saved[rule.n_primals:]
        fn, idx = rule.naive_present(primals)
        xs, cgs = vjp_of_vjp(fn, [primals[i] for i in idx], cots, [ggrads[i] for i in idx])
        gprimals = [None] * rule.n_primals
        for i, g in zip(idx, xs):
            gprimals[i] = g
        return (None, *gprimals, *cgs) + (None,) * (_SLOTS - rule.n_primals - rule.n_cotangents)

    @staticmethod
    def jvp(ctx, _trule, *tangents):
        """Forward-over-reverse (torch.func.hessian, jacfwd of jacrev): the naive recomputation's JVP (the
        extras are functions of the primals, whose tangents it already follows)."""
        rule = ctx.rule
        saved = ctx.saved_tensors
        primals, cots = saved[:rule.n_primals], saved[rule.n_primals:]
        tp, tc = tangents[:rule.n_primals], tangents[rule.n_primals:rule.n_primals + rule.n_cotangents]
        fn, idx = rule.naive_present(primals)
        out = jvp_of_vjp(fn, [primals[i] for i in idx], cots, [tp[i] for i in idx], tc)
        res = [None] * rule.n_primals
        for i, t in zip(idx, out):
            res[i] = t
        return tuple(res)


FusedBackward.vmap = vmap_by_example(FusedBackward)


def differentiable_backward(fused: Callable, naive: Callable, primals: Sequence, cotangents: Sequence,
                            extras: Sequence = ()) -> tuple:
    """The gradients of ``primals`` for the output ``cotangents`` (None = zero) of ``naive(*primals)``.

    ``fused(*primals, *cotangents, *extras)`` computes them (first-order path: the fused backward kernels, one
    entry per primal, None for an absent primal); ``naive(*primals)`` (an output or a tuple of outputs, one per
    cotangent; None primals passed as None) is the same function in plain differentiable PyTorch, recomputed
    only to differentiate these gradients again. ``extras`` are tensors the fused pass reads that are
    functions of the primals (saved statistics, outputs): they receive no gradient.
    """
    tensors = (*primals, *cotangents, *extras)
    if len(tensors) > _SLOTS:
        raise ValueError(f"differentiable_backward: at most {_SLOTS} tensors, got {len(tensors)}")
    rule = _BackwardRule(fused, naive, len(primals), len(cotangents), len(tensors))
    return FusedBackward.apply(rule, *tensors, *(None,) * (_SLOTS - len(tensors)))


# ---- torch.autocast ----------------------------------------------------------------------------------------

def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype of an enabled ``torch.autocast`` region on ``x``'s device type, else None.

    The public ops follow autocast's policy for SDPA and linear there: floating arguments other than float64
    are cast to this dtype (mixed inputs included), and the op runs with autocast disabled, so that its own
    float32 accumulation (the blockwise tiles, the row statistics) is not lowered by autocast.
    """
    if not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocasts_to_float32(op: str, device_type: str) -> bool:
    """Whether ``torch.autocast`` on ``device_type`` runs the aten op ``op`` (one of its float32-policy ops,
    such as "layer_norm") in float32: it has an autocast kernel there (CUDA, XPU, MPS; not CPU in PyTorch
    2.13). Without the dispatcher query: every device type but CPU."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", f"Autocast{device_type.upper()}")
    except (AttributeError, RuntimeError):
        return device_type != "cpu"


def autocast_cast(x, dtype: torch.dtype):
    """``x`` cast as autocast casts a lower-precision op's argument: floating tensors other than float64."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype not in (torch.float64, dtype):
        return x.to(dtype)
    return x


def autocast_tangent(t, primal, dtype: torch.dtype):
    """An explicit tangent under autocast: cast with its primal when it has the primal's dtype; a float32
    tangent of a 16-bit primal (the float32-tangent mode) stays float32."""
    if isinstance(t, torch.Tensor) and isinstance(primal, torch.Tensor) and t.dtype == primal.dtype:
        return autocast_cast(t, dtype)
    return t


def without_autocast(x: torch.Tensor):
    """A context that disables autocast on ``x``'s device type."""
    return torch.autocast(x.device.type, enabled=False)


def follows_autocast(*cast: str, tangents: Sequence[tuple] = ()):
    """Decorator of a public op whose first argument is a tensor: inside an enabled ``torch.autocast`` region on
    its device type, the arguments named in ``cast`` go through :func:`autocast_cast`, each (tangent, primal)
    pair named in ``tangents`` through :func:`autocast_tangent` (against the primal as given), and the op runs
    with autocast disabled. Outside autocast the call is unchanged."""
    def wrap(fn):
        names = list(inspect.signature(fn).parameters)
        cast_at = [(n, names.index(n)) for n in cast]
        tangent_at = [(t, names.index(t), p, names.index(p)) for t, p in tangents]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            dtype = autocast_dtype(args[0]) if args else None
            if dtype is None:
                return fn(*args, **kwargs)
            args = list(args)

            def get(name, i):
                return args[i] if i < len(args) else kwargs.get(name)

            def put(name, i, x):
                if i < len(args):
                    args[i] = x
                elif name in kwargs:
                    kwargs[name] = x
            for t, ti, p, pi in tangent_at:  # before the primals are cast: compared with the primal as given
                put(t, ti, autocast_tangent(get(t, ti), get(p, pi), dtype))
            for n, i in cast_at:
                put(n, i, autocast_cast(get(n, i), dtype))
            with without_autocast(args[0]):
                return fn(*args, **kwargs)
        return op
    return wrap


# ---- float32 tangents of 16-bit primals ------------------------------------------------------------------

SIXTEEN_BIT_DTYPES = (torch.float16, torch.bfloat16)


def tangent_dtype_allowed(tangent: torch.dtype, primal: torch.dtype) -> bool:
    """A tangent's dtype: its primal's, or float32 for a float16/bfloat16 primal."""
    return tangent == primal or (tangent == torch.float32 and primal in SIXTEEN_BIT_DTYPES)


def float32_tangents(primal: torch.Tensor, tangents) -> bool:
    """Whether float32 tangents come with a float16/bfloat16 primal (the float32-tangent path of the
    ``*_jvp`` ops and of attention_jvp)."""
    return primal.dtype in SIXTEEN_BIT_DTYPES and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tangents)


def widened_jvp(jvp, primals, tangents):
    """``jvp(primals, tangents)`` with every operand in float32 (None stays None): (y in the first primal's
    dtype, ty in float32). The primal is rounded once, at the output, as the 16-bit kernels round it; the
    tangent is never rounded to 16 bits. Differentiable (the casts are)."""
    dtype = primals[0].dtype
    up = tuple(None if x is None else x.float() for x in primals)
    y, ty = jvp(up, tuple(None if t is None else t.float() for t in tangents))
    return y.to(dtype), ty
