"""Activation checkpointing that also works under forward-mode AD, with a differentiable tangent.

``checkpoint(function, *args, policy=None, preserve_rng_state=True, **kwargs)`` has the contract of
``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, and in addition works when its inputs carry
forward-mode tangents (``torch.func.jvp`` or ``torch.autograd.forward_ad``) and a loss is differentiated
through the tangent output (reverse-over-forward, as TVM, LSD and ESD need). PyTorch's own checkpoint
fails there (torch 2.13): non-reentrant raises "CheckpointError: A different number of tensors was saved
during the original forward and recomputation"; reentrant has no forward-mode rule.

Forward-mode path. With primals x, tangents tx (``None`` = zero) and the parameters theta used by the
block, one ``torch.autograd.Function`` computes (y, ty) = (f(x; theta), J_x f(x; theta) tx) without
recording a graph and keeps only x and tx (plus, under a ``policy``, the outputs of selected ops). Its
backward restores the RNG state, recomputes (y, ty) with the graph and returns

    d<gy, y> + <gty, ty>  /  d(x, tx, theta)

by ``torch.autograd.grad``; the result is ``make_dual(y, ty)`` at the caller's forward-AD level.
Without tangents the call is ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

Selective checkpointing (``policy``): the outputs of the selected ops are kept from the forward and
replayed in the recomputation instead of being computed again. ``policy="attention"`` selects the package
attention kernels (``torch.ops.flowmap_kernels.attention_forward`` / ``attention_jvp_forward``: O, tO and
the row statistics), so the recomputation never runs attention again; it may also be a list of op
overloads / packets, or a callable ``op -> bool``.

``apply_activation_checkpointing(module, mode, blocks=None)`` routes each block's forward through
``checkpoint`` (the package DiT's ``module.blocks`` by default, or any list of modules such as a diffusers
transformer's ``transformer_blocks``). The wrapper sits inside the block's ``__call__``, so it composes with
FSDP2's ``fully_shard(block)`` (the gathered parameters are the ones recomputed and differentiated).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from .attention import kernels as _attention_kernels  # noqa: F401  (registers the custom ops)
from .backends import get_backend, use_backend
from .func import forward_mode_active

__all__ = ["checkpoint", "apply_activation_checkpointing", "ATTENTION_OPS", "MODES"]

#: The package's attention kernels whose outputs ``policy="attention"`` keeps (forward and forward+JVP).
ATTENTION_OPS = (torch.ops.flowmap_kernels.attention_forward.default,
                 torch.ops.flowmap_kernels.attention_jvp_forward.default)

#: Modes of :func:`apply_activation_checkpointing`.
MODES = ("blocks", "selective", "none")

_TORCH_ONLY_OPTIONS = ("use_reentrant", "context_fn", "determinism_check", "debug")

Policy = Union[None, str, Iterable[Any], Callable[[Any], bool]]


# --------------------------------------------------------------------------------------------------------
# policies


def _op_selector(policy: Policy) -> Optional[Callable[[Any], bool]]:
    """``policy`` -> a predicate on op overloads (None: recompute everything)."""
    if policy is None:
        return None
    if isinstance(policy, str):
        if policy != "attention":
            raise ValueError(f"policy: expected None, 'attention', a list of ops or a callable, got {policy!r}")
        policy = ATTENTION_OPS
    if callable(policy) and not isinstance(policy, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return policy
    if isinstance(policy, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        policy = (policy,)
    try:
        ops = tuple(policy)
    except TypeError:
        raise TypeError(f"policy: expected None, 'attention', a list of ops or a callable, "
                        f"got {type(policy).__name__}") from None
    overloads, packets = set(), set()
    for op in ops:
        if isinstance(op, torch._ops.OpOverload):
            overloads.add(op)
        elif isinstance(op, torch._ops.OpOverloadPacket):
            packets.add(op)
        else:
            raise TypeError(f"policy: list entries must be torch op overloads or packets "
                            f"(e.g. torch.ops.aten.mm.default), got {op!r}")
    return lambda op: op in overloads or getattr(op, "overloadpacket", None) in packets


class _RecordOps(TorchDispatchMode):
    """Keeps (op, detached outputs) of the ops the predicate selects, in call order."""

    def __init__(self, select):
        super().__init__()
        self.select, self.records = select, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.select(func):
            self.records.append((func, tree_map_only(torch.Tensor, lambda t: t.detach(), out)))
        return out


class _ReplayOps(TorchDispatchMode):
    """Returns the recorded outputs of the selected ops instead of running them again."""

    def __init__(self, select, records):
        super().__init__()
        self.select, self.records, self.next = select, records, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.select(func):
            return func(*args, **(kwargs or {}))
        if self.next >= len(self.records) or self.records[self.next][0] is not func:
            raise RuntimeError(f"checkpoint: the recomputation called {func} where the forward called "
                               f"{self.records[self.next][0] if self.next < len(self.records) else 'nothing'}; "
                               "the checkpointed function must run the same ops each time")
        out = self.records[self.next][1]
        self.next += 1
        return tree_map_only(torch.Tensor, lambda t: t.detach(), out)


def _torch_policy_context(select):
    """context_fn for torch's selective checkpoint: MUST_SAVE the selected ops, recompute the rest."""
    CP = torch_checkpoint.CheckpointPolicy

    def policy_fn(ctx, op, *args, **kwargs):
        return CP.MUST_SAVE if select(op) else CP.PREFER_RECOMPUTE

    return torch_checkpoint.create_selective_checkpoint_contexts(policy_fn)


# --------------------------------------------------------------------------------------------------------
# helpers


def _forward_and_tangent(call, primals, tangents):
    """(outputs tree, flat output primals, flat output tangents) of ``call(duals)`` at a forward-AD level.

    Uses the caller's active forward-AD level (forward-mode AD supports one level) or a fresh one.
    """
    level = contextlib.nullcontext() if fwAD._current_level >= 0 else fwAD.dual_level()
    with level, fwAD._set_fwd_grad_enabled(True):
        duals = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = call(duals)
        leaves, spec = tree_flatten(out)
        ys, tys = [], []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                d = fwAD.unpack_dual(x)
                ys.append(d.primal)
                tys.append(d.tangent)
    return leaves, spec, ys, tys


class _Run:
    """Everything one checkpointed call needs besides its tensors: the function, the argument structure,
    the RNG state at the forward, the op selector and its records, the output structure."""

    def __init__(self, function, leaves, spec, tensor_pos, params, select, preserve_rng_state):
        # the argument tree without its tensors (they are passed to ``call``; no reference kept here)
        is_tensor = set(tensor_pos)
        leaves = [None if i in is_tensor else x for i, x in enumerate(leaves)]
        self.function, self.leaves, self.spec, self.tensor_pos = function, leaves, spec, tensor_pos
        self.params, self.select, self.preserve_rng_state = params, select, preserve_rng_state
        self.records: list = []
        self.out_leaves = self.out_spec = self.out_tensor_pos = None
        self.rng = self.autocast = None
        self.pending = None  # (ys, tys) of the forward pass, handed to the autograd.Function
        self.backend = get_backend()  # the recomputation runs the same kernels as the forward

    def call(self, tensors):
        leaves = list(self.leaves)
        for i, x in zip(self.tensor_pos, tensors):
            leaves[i] = x
        args, kwargs = tree_unflatten(leaves, self.spec)
        return self.function(*args, **kwargs)

    def save_rng(self, tensors):
        """The forward's autocast state (always, as torch's checkpoint) and, with preserve_rng_state, its RNG
        state (CPU and the arguments' accelerator)."""
        device_type = torch_checkpoint._infer_device_type(*tensors)
        self.autocast = (device_type, torch_checkpoint._get_autocast_kwargs(device_type))
        if not self.preserve_rng_state:
            return
        devices, states = torch_checkpoint.get_device_states(*tensors)
        self.rng = (torch.get_rng_state(), device_type, devices, states)

    @contextlib.contextmanager
    def restored_state(self):
        """The forward's backend selection, autocast state and (with preserve_rng_state) RNG state."""
        device_type, (device_autocast, cpu_autocast) = self.autocast
        dev_ctx = (torch.amp.autocast(device_type=device_type, **device_autocast)
                   if device_autocast is not None and torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
        with use_backend(self.backend), dev_ctx, torch.amp.autocast("cpu", **cpu_autocast):
            if self.rng is None:
                yield
            else:
                with self._restored_rng():
                    yield

    @contextlib.contextmanager
    def _restored_rng(self):
        cpu_state, device_type, devices, states = self.rng
        with torch.random.fork_rng(devices=devices, enabled=True, device_type=device_type):
            torch.set_rng_state(cpu_state)
            if devices:
                torch_checkpoint.set_device_states(devices, states, device_type=device_type)
            yield


def _input_storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


class _CheckpointJVPFunction(torch.autograd.Function):
    """(run, *primals, *tangents, *params) -> (*ys, *tys); backward recomputes and differentiates.

    primals: the tensor arguments of the block; tangents: their tangents (None = zero); params: the
    trainable tensors the block closes over (explicit inputs so that they receive gradients). ys, tys:
    the output tensors and their tangents (None where an output has no tangent), computed by
    :func:`_forward_pass` before the call (the forward only hands them over, as plain tensors).
    """

    @staticmethod
    def forward(run: _Run, *flat):
        n = len(run.tensor_pos)
        ys, tys = run.pending
        run.pending = None
        # under torch.func.jvp this runs one functorch level lower, on unwrapped operands: unwrap the
        # outputs computed at the caller's level to the operands' level
        level = max([torch._C._functorch.maybe_get_level(x) for x in flat if isinstance(x, torch.Tensor)] + [-1])
        ys = [_unwrap_functorch(y, level) for y in ys]
        tys = [None if t is None else _unwrap_functorch(t, level) for t in tys]
        # an output that is (a view of) an input is copied: autograd.Function outputs must be new tensors
        inputs = _input_storages(flat[:2 * n])
        ys = [y.clone() if y.untyped_storage().data_ptr() in inputs else y for y in ys]
        tys = [None if t is None else (t.clone() if t.untyped_storage().data_ptr() in inputs else t) for t in tys]
        return (*ys, *tys)

    @staticmethod
    def setup_context(ctx, inputs, output):
        run, flat = inputs[0], inputs[1:]
        n = len(run.tensor_pos)
        ctx.run = run
        ctx.save_for_backward(*flat[:2 * n])
        ctx.set_materialize_grads(False)
        nondiff = [o for o in output if isinstance(o, torch.Tensor) and not (o.is_floating_point() or o.is_complex())]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)

    @staticmethod
    def backward(ctx, *grads):
        run = ctx.run
        n = len(run.tensor_pos)
        needs = ctx.needs_input_grad[1:]
        result = [None] * len(needs)
        if all(g is None for g in grads) or not any(needs):
            return (None, *result)
        if torch.is_grad_enabled():  # backward with create_graph=True
            raise NotImplementedError(
                "create_graph: double backward through flowmap_kernels.checkpoint under forward-mode AD is not "
                "supported (its gradients are computed by a recomputation off the graph); call the function "
                "without checkpoint for higher-order gradients")
        saved = ctx.saved_tensors
        primals, tangents = saved[:n], saved[n:2 * n]

        def leaf(x, need):
            if x is None:
                return None
            return x.detach().requires_grad_(bool(need) and (x.is_floating_point() or x.is_complex()))

        xs = [leaf(p, needs[i]) for i, p in enumerate(primals)]
        txs = [leaf(t, needs[n + i]) for i, t in enumerate(tangents)]
        mode = (_ReplayOps(run.select, run.records) if run.select is not None else contextlib.nullcontext())
        with torch.enable_grad(), run.restored_state(), mode:
            _, _, ys, tys = _forward_and_tangent(run.call, xs, txs)
        outs, gouts = [], []
        for y, g in zip(list(ys) + list(tys), grads):
            if g is not None and y is not None and y.requires_grad:
                outs.append(y)
                gouts.append(g)
        wrt_pos = [i for i, x in enumerate(xs + txs) if x is not None and x.requires_grad]
        param_pos = [2 * n + j for j, p in enumerate(run.params) if needs[2 * n + j]]
        wrt = [(xs + txs)[i] for i in wrt_pos] + [run.params[j - 2 * n] for j in param_pos]
        if outs and wrt:
            gs = torch.autograd.grad(outs, wrt, gouts, allow_unused=True)
            for i, g in zip(wrt_pos + param_pos, gs):
                result[i] = g
        return (None, *result)


def _unwrap_functorch(t: torch.Tensor, level: int = -1) -> torch.Tensor:
    """``t`` without torch.func's wrappers above ``level`` (-1: the plain tensor, where the autograd graph
    of a computation inside torch.func.jvp lives)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t) and torch._C._functorch.maybe_get_level(t) > level:
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _check_transforms() -> None:
    """Forward-mode checkpointing supports torch.func.jvp (and forward_ad) but no other torch.func transform
    around it: torch.func.grad / vjp refuse the saved-tensor hooks of the forward pass, and vmap is untested."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    others = [str(i.key()).split(".")[-1] for i in stack if i.key() != torch._C._functorch.TransformType.Jvp]
    if others:
        raise NotImplementedError(
            f"function: flowmap_kernels.checkpoint under forward-mode AD runs inside torch.func.jvp or "
            f"torch.autograd.forward_ad only, not inside torch.func transform(s) {others}; differentiate with "
            "torch.autograd (loss.backward / torch.autograd.grad) or call the function without checkpoint")


def _check_module_state_tangents(function) -> None:
    """Under forward-mode AD: refuse a module (or a bound method of one) whose parameters or buffers carry
    tangents (torch.func.jvp over ``functional_call``'s parameters): the recomputation would drop their
    tangents (gradients silently wrong), and PyTorch's checkpoint fails on them."""
    module = function if isinstance(function, nn.Module) else getattr(function, "__self__", None)
    if not isinstance(module, nn.Module):
        return
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, t in named:
            if fwAD.unpack_dual(t).tangent is not None:
                raise NotImplementedError(
                    f"function: its {kind} {name!r} carries a forward-mode tangent (e.g. torch.func.jvp over "
                    "functional_call's parameters); flowmap_kernels.checkpoint supports tangents on its "
                    "arguments only: pass the tensor as an argument, or call the function without checkpoint")


def _unwrap_partial(function, args, kwargs):
    """A functools.partial's bound arguments as arguments of the checkpoint (their tangents then count)."""
    while isinstance(function, functools.partial):
        args, kwargs = (*function.args, *args), {**function.keywords, **kwargs}
        function = function.func
    return function, args, kwargs


def _check_closure_tangents(function) -> None:
    """Under forward-mode AD: refuse a function whose closure holds a tensor carrying a tangent (``lambda x:
    block(x, c)`` with c from the JVP): the checkpoint differentiates along its arguments' tangents only, and
    the captured tangent would be dropped from the tangent output and its gradients, silently."""
    fn = getattr(function, "__func__", function)  # (a bound method's function)
    names = getattr(getattr(fn, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, getattr(fn, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell (a variable assigned later)
            continue
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor) and fwAD.unpack_dual(leaf).tangent is not None:
                raise NotImplementedError(
                    f"function: it captures {name!r}, a tensor carrying a forward-mode tangent; flowmap_kernels."
                    f"checkpoint differentiates along its arguments' tangents only: pass it as an argument "
                    f"(checkpoint(fn, x, {name}))")


def _forward_pass(run: _Run, primals, tangents) -> list:
    """The checkpointed forward: (y, ty) of the block with its graph recorded but no activation saved.

    Stores the outputs (detached, as plain tensors) in ``run.pending``, the records of the policy's ops in
    ``run.records`` and returns the leaf tensors requiring grad that the block uses (its parameters),
    found by walking the graph from the outputs. A tensor that requires grad, was computed outside the
    block and is used inside it without being an argument is an error (it cannot be made an input of
    the checkpoint).
    """
    start = torch.ones((), requires_grad=True).mul(1).grad_fn._sequence_nr()
    run.save_rng(primals)
    mode = _RecordOps(run.select) if run.select is not None else contextlib.nullcontext()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda _: None), mode:
        leaves, spec, ys, tys = _forward_and_tangent(run.call, [p.detach() for p in primals],
                                                     [None if t is None else t.detach() for t in tangents])
    if run.select is not None:
        run.records = mode.records
    run.out_leaves = [None if isinstance(x, torch.Tensor) else x for x in leaves]
    run.out_tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    run.out_spec = spec
    found, seen = {}, set()
    stack = [_unwrap_functorch(y).grad_fn for y in ys + tys if y is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            found[id(var)] = var
            continue
        if node._sequence_nr() < start:
            raise ValueError("function: it uses a tensor that requires grad and was computed outside the "
                             "checkpoint (not a leaf); pass that tensor as an argument of checkpoint")
        stack.extend(fn for fn, _ in node.next_functions)
    run.pending = ([y.detach() for y in ys], [None if t is None else t.detach() for t in tys])
    return list(found.values())


# --------------------------------------------------------------------------------------------------------
# public API


def checkpoint(function: Callable, *args, policy: Policy = None, preserve_rng_state: bool = True, **kwargs):
    """``function(*args, **kwargs)`` without keeping its activations; works under forward-mode AD.

    function: a callable (a module, a bound method of one, any function); the trainable tensors it uses
    (parameters, also ones shared with other modules) are found from the forward pass's graph, which is
    recorded without saving any activation. args / kwargs: any mix of tensors and other values, nested
    in tuples, lists, dicts; the output may be any such nesting too. Tensors are any dtype and device.

    Without forward-mode tangents: ``torch.utils.checkpoint.checkpoint(function, *args,
    use_reentrant=False, ...)``. With tangents (torch.func.jvp / forward_ad): stores the tensor arguments
    and their tangents only, returns duals (y, ty), and its backward recomputes the forward and JVP and
    differentiates <gy, y> + <gty, ty> with respect to the arguments, their tangents and the parameters.
    policy: None (recompute everything), "attention" (keep the package attention kernels' outputs), a
    list of op overloads / packets, or a callable op -> bool: the selected ops' outputs are saved and
    replayed during the recomputation. preserve_rng_state: restore the RNG state (CPU and the arguments'
    accelerator) for the recomputation, so dropout draws the same masks. Under torch.no_grad the call is
    just ``function(*args, **kwargs)``. Tangents on the parameters themselves are not supported (a module's
    parameters or buffers with tangents, e.g. torch.func.jvp over ``functional_call``, raise
    NotImplementedError), nor tensors with tangents captured by a closure (``lambda x: block(x, c)``: pass c as an
    argument; a functools.partial's bound arguments count as arguments), nor double backward (create_graph=True)
    through the forward-mode path. Under
    torch.compile the forward-mode path runs eagerly (a graph break); the reverse-mode one is traced.
    """
    if not callable(function):
        raise TypeError(f"function: expected a callable (module or function), got {type(function).__name__}")
    if not isinstance(preserve_rng_state, bool):
        raise TypeError(f"preserve_rng_state: expected a bool, got {type(preserve_rng_state).__name__}")
    bad = [k for k in _TORCH_ONLY_OPTIONS if k in kwargs]
    if bad:
        raise TypeError(f"{bad[0]}: not an option of flowmap_kernels.checkpoint (always non-reentrant; "
                        "use policy= for selective checkpointing)")
    select = _op_selector(policy)
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    function, args, kwargs = _unwrap_partial(function, args, kwargs)

    if forward_mode_active():
        return _checkpoint_forward_mode(function, args, kwargs, select, preserve_rng_state)
    return _torch_checkpoint(function, args, kwargs, select, preserve_rng_state)


def _torch_checkpoint(function, args, kwargs, select, preserve_rng_state):
    """PyTorch's non-reentrant checkpoint (with the policy as its selective-checkpoint context)."""
    # Dynamo traces a context_fn given as a function or functools.partial only (not a lambda): none, or a partial
    if select is None:
        return torch_checkpoint.checkpoint(function, *args, use_reentrant=False,
                                           preserve_rng_state=preserve_rng_state, **kwargs)
    return torch_checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                       context_fn=functools.partial(_torch_policy_context, select), **kwargs)


@torch.compiler.disable
def _checkpoint_forward_mode(function, args, kwargs, select, preserve_rng_state):
    """:func:`checkpoint` under an active forward-mode level. Run eagerly under torch.compile (a graph break):
    Dynamo cannot trace the functorch levels, saved-tensor hooks and dispatch modes this path uses (inside
    torch.func.jvp it failed with an internal functorch assertion)."""
    leaves, spec = tree_flatten((args, kwargs))
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    duals = [fwAD.unpack_dual(leaves[i]) for i in tensor_pos]
    _check_module_state_tangents(function)
    _check_closure_tangents(function)
    if not any(d.tangent is not None for d in duals):
        return _torch_checkpoint(function, args, kwargs, select, preserve_rng_state)

    _check_transforms()
    primals = [d.primal for d in duals]
    tangents = [d.tangent for d in duals]
    run = _Run(function, leaves, spec, tensor_pos, [], select, preserve_rng_state)
    params = _forward_pass(run, primals, tangents)
    if fwAD._current_level >= 0:
        for p in params:
            if fwAD.unpack_dual(p).tangent is not None:
                raise NotImplementedError("function: its parameters carry forward-mode tangents; checkpoint "
                                          "supports tangents on its arguments only")
    run.params = params
    if not run.out_tensor_pos:  # no tensor output: nothing to differentiate
        return tree_unflatten(list(run.out_leaves), run.out_spec)
    flat_out = _CheckpointJVPFunction.apply(run, *primals, *tangents, *params)
    m = len(flat_out) // 2
    ys, tys = flat_out[:m], flat_out[m:]
    out_leaves = list(run.out_leaves)
    for i, y, ty in zip(run.out_tensor_pos, ys, tys):
        out_leaves[i] = y if ty is None else fwAD.make_dual(y, ty)
    return tree_unflatten(out_leaves, run.out_spec)


def apply_activation_checkpointing(module: nn.Module, mode: str = "blocks",
                                   blocks: Union[None, str, Sequence[nn.Module]] = None,
                                   policy: Policy = None) -> nn.Module:
    """Run each block's forward through :func:`checkpoint`; returns ``module``.

    mode: "blocks" (recompute each block whole), "selective" (keep the outputs of ``policy``'s ops,
    by default the package attention kernels, and recompute the rest), "none" (undo). blocks: the list of
    blocks (e.g. a diffusers transformer's ``transformer_blocks``), the name of such an attribute of
    ``module``, or None for ``module.blocks`` (the package DiT). policy: only with mode="selective".
    The wrapper replaces ``block.forward`` on the instance (parameter names and state dicts unchanged) and
    sits inside ``block.__call__``, i.e. inside FSDP2's ``fully_shard(block)`` hooks.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if policy is not None and mode != "selective":
        raise ValueError(f"policy: only used with mode='selective', got mode={mode!r}")
    if blocks is None or isinstance(blocks, str):
        name = "blocks" if blocks is None else blocks
        found = getattr(module, name, None)
        if found is None:
            raise ValueError(f"blocks: {type(module).__name__} has no attribute {name!r}; pass the list of "
                             "blocks to checkpoint (e.g. blocks=model.transformer_blocks)")
        blocks = found
    blocks = list(blocks)
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise TypeError(f"blocks: entry {i} is a {type(b).__name__}, expected a torch.nn.Module")
    block_policy = (policy if policy is not None else "attention") if mode == "selective" else None
    _op_selector(block_policy)  # validate once
    for b in blocks:
        if isinstance(b.__dict__.get("forward"), CheckpointedForward):
            del b.forward
        if mode != "none":
            b.forward = CheckpointedForward(b.forward, block_policy)
    return module


def checkpoint_mode_and_policy(checkpoint_blocks) -> tuple:
    """(mode, policy) of apply_activation_checkpointing for a model's ``checkpoint_blocks`` argument:
    False -> "none", True -> "blocks", a mode name -> that mode, anything else -> a "selective" policy."""
    if checkpoint_blocks is False or checkpoint_blocks is None:
        return "none", None
    if checkpoint_blocks is True:
        return "blocks", None
    if isinstance(checkpoint_blocks, str) and checkpoint_blocks in MODES:
        return checkpoint_blocks, None
    if isinstance(checkpoint_blocks, str) and checkpoint_blocks != "attention":
        raise ValueError(f"checkpoint_blocks: expected a bool, one of {list(MODES)} or a policy, "
                         f"got {checkpoint_blocks!r}")
    _op_selector(checkpoint_blocks)
    return "selective", checkpoint_blocks


class CheckpointedForward:
    """A block's forward routed through :func:`checkpoint` (what apply_activation_checkpointing installs)."""

    def __init__(self, forward: Callable, policy: Policy = None):
        self.forward, self.policy = forward, policy

    def __call__(self, *args, **kwargs):
        return checkpoint(self.forward, *args, policy=self.policy, **kwargs)

    def __repr__(self) -> str:
        return f"CheckpointedForward(policy={self.policy!r})"
