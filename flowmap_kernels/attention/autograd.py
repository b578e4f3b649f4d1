"""torch.autograd.Functions for attention: the one place where autograd modes meet the kernels.

``AttentionFunction``     q, k, v -> O. Backward: the primal backward kernel. JVP rule: runs
                          ``AttentionJVPFunction`` so that the tangent it returns is itself
                          differentiable (reverse-over-forward, as TVM needs). ``attention`` calls
                          ``AttentionJVPFunction`` directly when its inputs carry tangents, so this
                          rule is a fallback for forward-mode levels it cannot see.
``AttentionJVPFunction``  q, k, v, tq, tk, tv -> (O, tO) in one fused pass; backward through both outputs;
                          its own JVP (forward-over-forward) through the naive recomputation.

A float mask (an additive bias) may require grad: the backward Functions then also return its gradient, from
one extra blockwise pass (``kernels.attention_mask_backward``, the same for every backend), and their second
derivatives include the mask. A mask with a forward-mode tangent: ``functional.attention`` runs the naive math
for it; the jvp rules here (reached from forward-mode levels that it cannot see) follow that tangent through
the naive recomputation.

``PrimalBackward`` / ``JVPBackward`` run the backward kernels; they are themselves differentiable
(create_graph=True, torch.func.grad over jvp, jacrev of jacrev, and forward-over-reverse as in
torch.func.hessian) through a recomputation in the naive math that runs only when a second derivative is
actually taken, so the first-order path never pays for it: the strategy of ``_autodiff`` (``vjp_of_vjp`` /
``jvp_of_vjp``), which the DiT primitives' backward passes share (``_autodiff.differentiable_backward``;
these two keep Functions of their own for their vmap rules and the mask argument).

Every Function has a ``vmap`` rule (torch.func.vmap, hence jacrev / jacfwd / per-sample gradients): the
vmapped dim is folded into the batch dim and the same Function runs once on the folded tensors.
"""
from __future__ import annotations

import dataclasses

import torch

from .._autodiff import (forward_over_forward, jvp_by_reverse, jvp_of_vjp, record_tangent_output, redual_saved,
                         vjp_of_vjp, without_jvp, zeros_if_none)
from . import kernels, naive
from .problem import AttentionProblem, check_tangent_dtypes


def _with_mask_grad(ctx, problem: AttentionProblem, mask_index: int) -> AttentionProblem:
    """``problem`` with ``mask_grad`` set when the Function's mask input (a float mask) needs a gradient."""
    if ctx.needs_input_grad[mask_index] and problem.mask_kind == "float":
        return dataclasses.replace(problem, mask_grad=True)
    return problem


def _naive(fn, p: AttentionProblem, with_mask: bool):
    """``fn(*inputs, p)`` (a naive-math function), taking the mask as a last argument when ``with_mask``:
    the recomputation that second derivatives differentiate (with respect to the mask too when it needs a
    gradient or carries a tangent)."""
    if not with_mask:
        return lambda *a: fn(*a, p)
    return lambda *a: fn(*a[:-1], dataclasses.replace(p, mask=a[-1]))


def _naive_tuple(fn, p: AttentionProblem, with_mask: bool):
    """:func:`_naive` with a one-tuple output (for a single-output ``fn``)."""
    f = _naive(fn, p, with_mask)
    return lambda *a: (f(*a),)


def _with(inputs: tuple, mask, with_mask: bool) -> tuple:
    return (*inputs, mask) if with_mask else tuple(inputs)


def _mask_pass(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, p: AttentionProblem):
    """The mask's gradient when ``p.mask_grad``, else None."""
    if not p.mask_grad:
        return None
    return kernels.attention_mask_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, p.is_causal, p.scale)


# ---- torch.func.vmap: the vmapped dimension is folded into the batch dimension ----------------------------
# Each Function's ``vmap`` staticmethod receives the inputs with their vmapped dims (in_dims), moves that dim
# to the front, merges it with the batch dim (N, B, ...) -> (N * B, ...) (an unbatched input is expanded),
# calls the same Function again on the folded tensors and splits the outputs back to (N, B, ...). Nested vmap
# levels fold one at a time; gradients of the folding views are autograd's.

def _fold(x, bdim, n: int):
    """A (B, ...) input with a vmapped dim at ``bdim`` (None: unbatched) as a contiguous (n * B, ...) tensor
    (contiguous: the Triton launchers index lse and mu as dense (B, Hq, Lq) arrays)."""
    if x is None:
        return None
    x = x.unsqueeze(0).expand(n, *x.shape) if bdim is None else x.movedim(bdim, 0)
    return x.reshape(n * x.shape[1], *x.shape[2:]).contiguous()


def _fold_mask(mask, bdim, n: int, batch: int):
    """A mask broadcastable to (B, Hq, Lq, Lk), vmapped at ``bdim``, as one broadcastable to (n * B, Hq, Lq, Lk)."""
    if mask is None:
        return None
    if bdim is None:
        if mask.dim() < 4 or mask.shape[0] == 1:
            return mask  # no batch dim of its own: it broadcasts over n * B as it did over B
        mask = mask.unsqueeze(0).expand(n, *mask.shape)
    else:
        mask = mask.movedim(bdim, 0)
    mask = mask.reshape(n, *(1,) * (5 - mask.dim()), *mask.shape[1:])  # (n, b, h, lq, lk), b in (1, B)
    mask = mask.expand(n, batch, *mask.shape[2:])
    return mask.reshape(n * batch, *mask.shape[2:])


def _fold_problem(problem: AttentionProblem, mask, mask_bdim, n: int):
    folded = _fold_mask(mask, mask_bdim, n, problem.batch)
    return folded, dataclasses.replace(problem, batch=n * problem.batch, mask=folded)


def _unfold(outputs, n: int):
    """Outputs (n * B, ...) back to (n, B, ...), vmapped at dim 0 (None stays None, out_dim None)."""
    outs = tuple(None if o is None else o.reshape(n, o.shape[0] // n, *o.shape[1:]) for o in outputs)
    return outs, tuple(None if o is None else 0 for o in outs)


def _fold_mask_for_grad(mask, bdim, n: int, batch: int):
    """A float mask whose gradient a vmapped backward returns, folded to an explicit (n * B, ...) batch so that
    each example's gradient stays apart; also the mask's shape per example."""
    example = tuple(mask.shape) if bdim is None else tuple(mask.shape[:bdim] + mask.shape[bdim + 1:])
    m = mask.unsqueeze(0).expand(n, *mask.shape) if bdim is None else mask.movedim(bdim, 0)
    m = m.reshape(n, *(1,) * (4 - len(example)), *example)  # (n, b, h, lq, lk), b in (1, B)
    return m.expand(n, batch, *m.shape[2:]).reshape(n * batch, *m.shape[2:]), example


def _unfold_mask_grad(grad, n: int, example: tuple):
    """The (n * B, h, lq, lk) gradient of :func:`_fold_mask_for_grad`'s mask as (n, *example)."""
    grad = grad.reshape(n, grad.shape[0] // n, *grad.shape[1:])
    return grad.sum_to_size(n, *(1,) * (4 - len(example)), *example).reshape(n, *example)


def _vmap_rule(fn, tensor_args: int, mask_index: int):
    """The ``vmap`` staticmethod of a Function whose args are ``tensor_args`` batch-leading tensors (the mask
    among them at ``mask_index``), then the problem and the backend name. With ``problem.mask_grad`` (a backward
    Function whose last output is the mask's gradient) the mask is folded per example and its gradient unfolded."""
    def vmap(info, in_dims, *args):
        n = info.batch_size
        tensors, (problem, backend) = list(args[:tensor_args]), args[tensor_args:]
        dims = in_dims[:tensor_args]
        folded = [None if i == mask_index else _fold(x, d, n) for i, (x, d) in enumerate(zip(tensors, dims))]
        if problem.mask_grad:
            folded[mask_index], example = _fold_mask_for_grad(tensors[mask_index], dims[mask_index], n,
                                                              problem.batch)
            problem = dataclasses.replace(problem, batch=n * problem.batch, mask=folded[mask_index])
            *out, dmask = fn().apply(*folded, problem, backend)
            outs, out_dims = _unfold(out, n)
            return (*outs, _unfold_mask_grad(dmask, n, example)), (*out_dims, 0)
        folded[mask_index], problem = _fold_problem(problem, tensors[mask_index], dims[mask_index], n)
        out = fn().apply(*folded, problem, backend)
        return _unfold(out if isinstance(out, tuple) else (out,), n)
    return staticmethod(vmap)


class AttentionFunction(torch.autograd.Function):
    """O = softmax(scale * Q K^T + mask) V with forward-mode and reverse-mode rules."""

    @staticmethod
    def forward(q, k, v, mask, problem: AttentionProblem, backend: str):
        o, lse = kernels.attention_forward(q, k, v, mask, problem.is_causal, problem.scale, backend)
        return o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, problem, backend = inputs
        o, lse = output
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(q, k, v, mask, o, lse)
        ctx.save_for_forward(q, k, v, mask)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, mask, o, lse = ctx.saved_tensors
        p = ctx.problem
        if do is None:
            return None, None, None, None, None, None
        dq, dk, dv, dmask = PrimalBackward.apply(q, k, v, o, lse, do, mask, _with_mask_grad(ctx, p, 3), ctx.backend)
        return dq, dk, dv, dmask, None, None

    vmap = _vmap_rule(lambda: AttentionFunction, 4, 3)

    @staticmethod
    def jvp(ctx, tq, tk, tv, tmask, _tproblem, _tbackend):
        q, k, v, mask = ctx.saved_tensors
        check_tangent_dtypes((q, k, v), (tq, tk, tv))
        if tmask is not None:  # the fused pass takes the mask as a constant: the naive math's JVP
            (to,) = jvp_by_reverse(_naive(naive.attention, ctx.problem, True), (q, k, v, mask), (tq, tk, tv, tmask))
            return to, None
        tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
        _, to, _, _ = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, mask, ctx.problem, ctx.backend)
        return to, None


# ``functional.attention`` applies the jvp-less twin while ``torch.compiler.is_compiling()`` and no forward-mode
# AD level is active (with one active it runs the naive math instead: AOTAutograd would give the custom ops a
# zero tangent); ``attention_jvp`` applies AttentionJVPFunction's twin there.
AttentionCompiledFunction = without_jvp(AttentionFunction)
AttentionCompiledFunction.vmap = _vmap_rule(lambda: AttentionCompiledFunction, 4, 3)


class AttentionJVPFunction(torch.autograd.Function):
    """(O, tO) = attention and its tangent along (tq, tk, tv), differentiable in all six inputs."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, problem: AttentionProblem, backend: str):
        o, to, lse, mu = kernels.attention_jvp_forward(
            q, k, v, tq, tk, tv, mask, problem.is_causal, problem.scale, backend, problem.tangent_fp32)
        return o, to, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, mask, problem, backend = inputs
        o, to, lse, mu = output
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(q, k, v, tq, tk, tv, mask, o, to, lse, mu)
        ctx.save_for_forward(q, k, v, tq, tk, tv, mask)
        ctx.mark_non_differentiable(lse, mu)
        record_tangent_output(ctx, to)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, dto, _dlse, _dmu):
        q, k, v, tq, tk, tv, mask, o, to, lse, mu = ctx.saved_tensors
        q, k, v = redual_saved(ctx, (q, k, v, tq, tk, tv), ((0, 3), (1, 4), (2, 5)))[:3]
        p = _with_mask_grad(ctx, ctx.problem, 6)
        none3 = (None, None, None)
        if dto is None or not ctx.tangent_grad:
            if do is None:
                return (None,) * 9
            dq, dk, dv, dmask = PrimalBackward.apply(q, k, v, o, lse, do, mask, p, ctx.backend)
            return (dq, dk, dv) + none3 + (dmask, None, None)
        if dto.dtype != q.dtype:  # a float32 tangent output (tangent_dtype): the backward kernels take the
            to, dto = to.to(q.dtype), dto.to(q.dtype)  # inputs' dtype (products in it, accumulation in fp32)
        *grads, dmask = JVPBackward.apply(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, p, ctx.backend)
        return tuple(grads) + (dmask, None, None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dtq, dtk, dtv, tmask, _tproblem, _tbackend):
        """Forward-over-forward (a JVP of this JVP: nested torch.func.jvp, jacfwd of jacfwd): the naive
        formula's JVP (the softmax's second derivatives; (B, H, Lq, Lk) memory, only when one is taken),
        along the mask's tangent too when it has one."""
        *xs, mask = ctx.saved_tensors
        with_mask = tmask is not None
        do, dto = forward_over_forward(_naive(naive.attention_jvp, ctx.problem, with_mask), _with(xs, mask, with_mask),
                                       _with((dq, dk, dv, dtq, dtk, dtv), tmask, with_mask), ctx.tangent_grad)
        return do, dto, None, None

    vmap = _vmap_rule(lambda: AttentionJVPFunction, 7, 6)


AttentionJVPCompiledFunction = without_jvp(AttentionJVPFunction)
AttentionJVPCompiledFunction.vmap = _vmap_rule(lambda: AttentionJVPCompiledFunction, 7, 6)


class PrimalBackward(torch.autograd.Function):
    """(dQ, dK, dV, dMask) = backward kernel of the primal (dMask None unless ``problem.mask_grad``);
    differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, o, lse, do, mask, problem: AttentionProblem, backend: str):
        dq, dk, dv = kernels.attention_backward(q, k, v, o, lse, do, mask, problem.is_causal, problem.scale,
                                                backend)
        dmask = _mask_pass(q, k, v, None, None, None, o, None, lse, None, do, None, mask, problem)
        return dq, dk, dv, dmask

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, do, mask, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, do, mask)
        ctx.save_for_forward(q, k, v, do, mask)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv, gdmask):
        q, k, v, do, mask = ctx.saved_tensors
        p = ctx.problem
        with_mask = ctx.needs_input_grad[6]
        grads, (gdo,) = vjp_of_vjp(_naive_tuple(naive.attention, p, with_mask), _with((q, k, v), mask, with_mask),
                                   (do,), _with((gdq, gdk, gdv), gdmask, with_mask))
        gmask = grads.pop() if with_mask else None
        return (*grads, None, None, gdo, gmask, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _to, _tlse, tdo, tmask, _tproblem, _tbackend):
        """Forward-over-reverse (torch.func.hessian, jacfwd of jacrev): the naive recomputation's JVP; O and
        lse are functions of (q, k, v) and the mask, whose tangents it already follows."""
        q, k, v, do, mask = ctx.saved_tensors
        p = ctx.problem
        with_mask = p.mask_grad or tmask is not None
        out = jvp_of_vjp(_naive_tuple(naive.attention, p, with_mask), _with((q, k, v), mask, with_mask), (do,),
                         _with((tq, tk, tv), tmask, with_mask), (tdo,))
        return (*out[:3], out[3] if p.mask_grad else None)

    vmap = _vmap_rule(lambda: PrimalBackward, 7, 6)


class JVPBackward(torch.autograd.Function):
    """Gradients of (O, tO) for all six inputs from the fused kernel, and the mask's (None unless
    ``problem.mask_grad``); differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, problem: AttentionProblem, backend: str):
        grads = kernels.attention_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask,
                                               problem.is_causal, problem.scale, backend)
        return (*grads, _mask_pass(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, problem))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, tq, tk, tv, do, dto, mask)
        ctx.save_for_forward(q, k, v, tq, tk, tv, do, dto, mask)

    @staticmethod
    def backward(ctx, *ggrads):
        q, k, v, tq, tk, tv, do, dto, mask = ctx.saved_tensors
        p = ctx.problem
        with_mask = ctx.needs_input_grad[12]
        grads, (gdo, gdto) = vjp_of_vjp(_naive(naive.attention_jvp, p, with_mask),
                                        _with((q, k, v, tq, tk, tv), mask, with_mask), (do, dto),
                                        _with(ggrads[:6], ggrads[6], with_mask))
        gmask = grads.pop() if with_mask else None
        return (*grads, None, None, None, None, gdo, gdto, gmask, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, ttq, ttk, ttv, _to, _tto, _tlse, _tmu, tdo, tdto, tmask, _tproblem, _tbackend):
        """Forward-over-reverse through (O, tO): the naive recomputation's JVP."""
        q, k, v, tq0, tk0, tv0, do, dto, mask = ctx.saved_tensors
        p = ctx.problem
        with_mask = p.mask_grad or tmask is not None
        out = jvp_of_vjp(_naive(naive.attention_jvp, p, with_mask), _with((q, k, v, tq0, tk0, tv0), mask, with_mask),
                         (do, dto), _with((tq, tk, tv, ttq, ttk, ttv), tmask, with_mask), (tdo, tdto))
        return (*out[:6], out[6] if p.mask_grad else None)

    vmap = _vmap_rule(lambda: JVPBackward, 13, 12)
