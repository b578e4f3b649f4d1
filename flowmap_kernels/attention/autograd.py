"""torch.autograd.Functions for attention: the one place where autograd modes meet the kernels.

``AttentionFunction``     q, k, v -> O. Backward: the primal backward kernel. JVP rule: runs
                          ``AttentionJVPFunction`` so that the tangent it returns is itself
                          differentiable (reverse-over-forward, as TVM needs).
``AttentionJVPFunction``  q, k, v, tq, tk, tv -> (O, tO) in one fused pass; backward through both outputs.

Under create_graph=True (double backward of the primal) the backward is recomputed with the naive
math so it is differentiable; that path holds N x N scores.
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
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            with torch.enable_grad():
                need = [x for x in (q, k, v) if x.requires_grad]
                out = naive.attention(q, k, v, p)
                grads = iter(torch.autograd.grad(out, need, do, create_graph=True))
                dq, dk, dv = (next(grads) if x.requires_grad else None for x in (q, k, v))
            return dq, dk, dv, None, None, None
        dq, dk, dv = kernels.attention_backward(q, k, v, o, lse, do, mask, p.is_causal, p.scale, ctx.backend)
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
            dq, dk, dv = kernels.attention_backward(q, k, v, o, lse, do, mask, p.is_causal, p.scale, ctx.backend)
            return (dq, dk, dv) + none3 + none3
        grads = kernels.attention_jvp_backward(
            q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, p.is_causal, p.scale, ctx.backend)
        return tuple(grads) + none3
