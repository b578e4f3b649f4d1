"""torch.autograd.Functions for attention: the one place where autograd modes meet the kernels.

``AttentionFunction``     q, k, v -> O. Backward: the primal backward kernel. JVP rule: runs
                          ``AttentionJVPFunction`` so that the tangent it returns is itself
                          differentiable (reverse-over-forward, as TVM needs). ``attention`` calls
                          ``AttentionJVPFunction`` directly when its inputs carry tangents, so this
                          rule is a fallback for forward-mode levels it cannot see.
``AttentionJVPFunction``  q, k, v, tq, tk, tv -> (O, tO) in one fused pass; backward through both outputs.

``PrimalBackward`` / ``JVPBackward`` run the backward kernels; they are themselves differentiable
(create_graph=True, torch.func.grad over jvp) through a recomputation in the naive math that runs only
when a second derivative is actually taken, so the first-order path never pays for it.
"""
from __future__ import annotations

import torch

from . import kernels, naive
from .problem import AttentionProblem


def _check_mask_tangent(mask_tangent) -> None:
    if mask_tangent is not None:
        raise ValueError("attn_mask: forward-mode tangents of the mask are not supported (the mask must be a constant)")


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
        dq, dk, dv = PrimalBackward.apply(q, k, v, o, lse, do, mask, p, ctx.backend)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, tmask, _tproblem, _tbackend):
        _check_mask_tangent(tmask)
        q, k, v, mask = ctx.saved_tensors
        tq = torch.zeros_like(q) if tq is None else tq
        tk = torch.zeros_like(k) if tk is None else tk
        tv = torch.zeros_like(v) if tv is None else tv
        _, to, _, _ = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, mask, ctx.problem, ctx.backend)
        return to, None


class AttentionCompiledFunction(torch.autograd.Function):
    """``AttentionFunction`` without its jvp rule, for regions that torch.compile traces.

    Dynamo refuses to trace an autograd.Function that defines ``jvp`` when an input requires grad
    (graph break "Unsupported custom jvp"), so ``functional.attention`` uses this class while
    ``torch.compiler.is_compiling()`` and no forward-mode AD level is active (with one active it runs the
    naive math instead: AOTAutograd would give the custom ops a zero tangent). Forward, setup_context and
    backward are AttentionFunction's, unchanged.
    """

    forward = staticmethod(AttentionFunction.forward)
    setup_context = staticmethod(AttentionFunction.setup_context)
    backward = staticmethod(AttentionFunction.backward)


class AttentionJVPFunction(torch.autograd.Function):
    """(O, tO) = attention and its tangent along (tq, tk, tv), differentiable in all six inputs."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, problem: AttentionProblem, backend: str):
        o, to, lse, mu = kernels.attention_jvp_forward(
            q, k, v, tq, tk, tv, mask, problem.is_causal, problem.scale, backend)
        return o, to, lse, mu

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, mask, problem, backend = inputs
        o, to, lse, mu = output
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(q, k, v, tq, tk, tv, mask, o, to, lse, mu)
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, dto, _dlse, _dmu):
        q, k, v, tq, tk, tv, mask, o, to, lse, mu = ctx.saved_tensors
        p = ctx.problem
        none3 = (None, None, None)
        if dto is None:
            if do is None:
                return (None,) * 9
            dq, dk, dv = PrimalBackward.apply(q, k, v, o, lse, do, mask, p, ctx.backend)
            return (dq, dk, dv) + none3 + none3
        grads = JVPBackward.apply(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, p, ctx.backend)
        return tuple(grads) + none3


def _vjp_of_vjp(outputs_fn, primals, cotangents, grads_of_grads):
    """Gradients of <vjp(outputs_fn)(primals; cotangents), grads_of_grads> for primals and cotangents."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in primals]
        cs = [None if c is None else c.detach().requires_grad_() for c in cotangents]
        outs = outputs_fn(*xs)
        pairs = [(o, c) for o, c in zip(outs, cs) if c is not None]
        first = torch.autograd.grad([o for o, _ in pairs], xs, [c for _, c in pairs], create_graph=True)
        wanted = [(f, g) for f, g in zip(first, grads_of_grads) if g is not None]
        inputs = xs + [c for c in cs if c is not None]
        second = torch.autograd.grad([f for f, _ in wanted], inputs, [g for _, g in wanted], allow_unused=True)
    it = iter(second[len(xs):])
    return list(second[:len(xs)]), [None if c is None else next(it) for c in cs]


class PrimalBackward(torch.autograd.Function):
    """(dQ, dK, dV) = backward kernel of the primal; differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, o, lse, do, mask, problem: AttentionProblem, backend: str):
        return kernels.attention_backward(q, k, v, o, lse, do, mask, problem.is_causal, problem.scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, do, mask, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, do)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        q, k, v, do = ctx.saved_tensors
        p = ctx.problem
        (gq, gk, gv), (gdo,) = _vjp_of_vjp(lambda a, b, c: (naive.attention(a, b, c, p),), (q, k, v), (do,),
                                           (gdq, gdk, gdv))
        return gq, gk, gv, None, None, gdo, None, None, None


class JVPBackward(torch.autograd.Function):
    """Gradients of (O, tO) for all six inputs from the fused kernel; differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, problem: AttentionProblem, backend: str):
        return kernels.attention_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask,
                                              problem.is_causal, problem.scale, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, tq, tk, tv, do, dto)

    @staticmethod
    def backward(ctx, *ggrads):
        q, k, v, tq, tk, tv, do, dto = ctx.saved_tensors
        p = ctx.problem
        xs, (gdo, gdto) = _vjp_of_vjp(lambda *a: naive.attention_jvp(*a, p), (q, k, v, tq, tk, tv), (do, dto),
                                      ggrads)
        return (*xs, None, None, None, None, gdo, gdto, None, None, None)
