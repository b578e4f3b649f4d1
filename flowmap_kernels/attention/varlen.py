"""Variable-length (packed) attention with forward-mode AD and backward through the tangent.

Sequences of different lengths are packed along the token dim (the flash-attn varlen convention):
q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), and int32 offsets cu_seqlens_q,
cu_seqlens_k (B + 1,) such that sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and key rows
cu_seqlens_k[i]:cu_seqlens_k[i+1]. Each sequence is attended exactly as scaled_dot_product_attention on
that sequence alone (no attention across sequences, causal top-left aligned per sequence, GQA head h
reading key head h // (Hq / Hkv)); no padded work is done.

``VarlenFunction``     q, k, v -> O; backward by the primal backward kernel; its JVP rule runs
                       ``VarlenJVPFunction`` (fallback for forward-mode levels ``attention_varlen`` cannot see).
``VarlenJVPFunction``  q, k, v, tq, tk, tv -> (O, tO) in one fused pass; backward through both outputs; its
                       own JVP (forward-over-forward) through the naive recomputation.
Both call the custom ops of :mod:`.kernels` with a backend name, so one pair serves every backend; the
backward Functions are themselves differentiable through a naive recomputation (double backward).
"""
from __future__ import annotations

import torch

from . import kernels, varlen_naive
from ..func import forward_mode_active
from .._autodiff import (apply_on_unpacked, follows_autocast, for_compile, forward_over_forward, jvp_of_vjp,
                         make_dual, record_dual_level, redual_saved, unpack_duals, vjp_of_vjp, without_jvp,
                         zeros_if_none)
from .functional import warn_compiled_forward_mode
from .varlen_problem import VarlenProblem, make_varlen_problem, offsets_int32
from .varlen_registry import ATTENTION_VARLEN


def _options(problem: VarlenProblem, backend: str) -> tuple:
    """The varlen kernel ops' trailing arguments, in the order all four share: the longest query and key
    sequence, causality, scale and the backend name."""
    return problem.max_q, problem.max_k, problem.is_causal, problem.scale, backend


class VarlenFunction(torch.autograd.Function):
    """O = softmax(scale Q_i K_i^T) V_i per sequence, with forward-mode and reverse-mode rules."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, problem: VarlenProblem, backend: str):
        return kernels.attention_varlen_forward(q, k, v, cu_q, cu_k, *_options(problem, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, problem, backend = inputs
        o, lse = output
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(q, k, v, cu_q, cu_k, o, lse)
        ctx.save_for_forward(q, k, v, cu_q, cu_k)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, cu_q, cu_k, o, lse = ctx.saved_tensors
        if do is None:
            return (None,) * 7
        dq, dk, dv = VarlenPrimalBackward.apply(q, k, v, o, lse, do, cu_q, cu_k, ctx.problem, ctx.backend)
        return dq, dk, dv, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tcu_q, _tcu_k, _tproblem, _tbackend):
        q, k, v, cu_q, cu_k = ctx.saved_tensors
        tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
        _, to, _, _ = VarlenJVPFunction.apply(q, k, v, tq, tk, tv, cu_q, cu_k, ctx.problem, ctx.backend)
        return to, None


class VarlenJVPFunction(torch.autograd.Function):
    """(O, tO) = packed attention and its tangent along (tq, tk, tv), differentiable in all six inputs."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, cu_q, cu_k, problem: VarlenProblem, backend: str):
        return kernels.attention_varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, *_options(problem, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, cu_q, cu_k, problem, backend = inputs
        o, to, lse, mu = output
        ctx.problem, ctx.backend = problem, backend
        ctx.save_for_backward(q, k, v, tq, tk, tv, cu_q, cu_k, o, to, lse, mu)
        ctx.save_for_forward(q, k, v, tq, tk, tv)
        ctx.mark_non_differentiable(lse, mu)
        ctx.set_materialize_grads(False)
        record_dual_level(ctx)

    @staticmethod
    def backward(ctx, do, dto, _dlse, _dmu):
        q, k, v, tq, tk, tv, cu_q, cu_k, o, to, lse, mu = ctx.saved_tensors
        q, k, v = redual_saved(ctx, (q, k, v, tq, tk, tv), ((0, 3), (1, 4), (2, 5)))[:3]
        none4 = (None,) * 4
        if dto is None:
            if do is None:
                return (None,) * 10
            dq, dk, dv = VarlenPrimalBackward.apply(q, k, v, o, lse, do, cu_q, cu_k, ctx.problem, ctx.backend)
            return (dq, dk, dv, None, None, None) + none4
        grads = VarlenJVPBackward.apply(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, ctx.problem,
                                        ctx.backend)
        return tuple(grads) + none4

    @staticmethod
    def jvp(ctx, dq, dk, dv, dtq, dtk, dtv, _tcu_q, _tcu_k, _tproblem, _tbackend):
        """Forward-over-forward (nested torch.func.jvp): the naive per-sequence formula's JVP."""
        p = ctx.problem
        do, dto = forward_over_forward(lambda *a: varlen_naive.attention_jvp(*a, p), ctx.saved_tensors,
                                       (dq, dk, dv, dtq, dtk, dtv), True)
        return do, dto, None, None


VarlenCompiledFunction = without_jvp(VarlenFunction)
VarlenJVPCompiledFunction = without_jvp(VarlenJVPFunction)


class VarlenPrimalBackward(torch.autograd.Function):
    """(dQ, dK, dV) by the primal backward kernel; differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, o, lse, do, cu_q, cu_k, problem: VarlenProblem, backend: str):
        return kernels.attention_varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, *_options(problem, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, o, lse, do, cu_q, cu_k, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, do)
        ctx.save_for_forward(q, k, v, do)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv):
        q, k, v, do = ctx.saved_tensors
        p = ctx.problem
        (gq, gk, gv), (gdo,) = vjp_of_vjp(lambda a, b, c: (varlen_naive.attention(a, b, c, p),), (q, k, v),
                                          (do,), (gdq, gdk, gdv))
        return gq, gk, gv, None, None, gdo, None, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, _to, _tlse, tdo, _tcu_q, _tcu_k, _tproblem, _tbackend):
        """Forward-over-reverse (torch.func.hessian, forward_ad over autograd.grad): the naive recomputation's
        JVP (O and lse are functions of q, k, v, whose tangents it follows)."""
        q, k, v, do = ctx.saved_tensors
        p = ctx.problem
        return tuple(jvp_of_vjp(lambda a, b, c: (varlen_naive.attention(a, b, c, p),), (q, k, v), (do,),
                                (tq, tk, tv), (tdo,))[:3])


class VarlenJVPBackward(torch.autograd.Function):
    """Gradients of (O, tO) for all six inputs by the fused kernel; differentiable (naive recomputation)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, problem: VarlenProblem, backend: str):
        return kernels.attention_varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k,
                                                     *_options(problem, backend))

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, problem, backend = inputs
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, tq, tk, tv, do, dto)
        ctx.save_for_forward(q, k, v, tq, tk, tv, do, dto)

    @staticmethod
    def backward(ctx, *ggrads):
        q, k, v, tq, tk, tv, do, dto = ctx.saved_tensors
        p = ctx.problem
        xs, (gdo, gdto) = vjp_of_vjp(lambda *a: varlen_naive.attention_jvp(*a, p), (q, k, v, tq, tk, tv),
                                     (do, dto), ggrads)
        return (*xs, None, None, None, None, gdo, gdto, None, None, None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, ttq, ttk, ttv, _to, _tto, _tlse, _tmu, tdo, tdto, _tcu_q, _tcu_k, _tproblem, _tbackend):
        """Forward-over-reverse through (O, tO): the naive recomputation's JVP."""
        q, k, v, tq0, tk0, tv0, do, dto = ctx.saved_tensors
        p = ctx.problem
        return tuple(jvp_of_vjp(lambda *a: varlen_naive.attention_jvp(*a, p), (q, k, v, tq0, tk0, tv0), (do, dto),
                                (tq, tk, tv, ttq, ttk, ttv), (tdo, tdto))[:6])


def resolve_varlen_backend(problem: VarlenProblem, backend=None) -> str:
    """The backend name that will run ``problem`` (``backend`` or the one in force)."""
    return ATTENTION_VARLEN.backend_name(backend, **problem.as_dict())


@follows_autocast("query", "key", "value")
def attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                     is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """Attention over sequences packed along the token dim, with forward-mode AD.

    query (total_q, Hq, D), key (total_k, Hkv, D), value (total_k, Hkv, Dv) -> (total_q, Hq, Dv), same
    dtype. cu_seqlens_q / cu_seqlens_k: int32 (or int64) cumulative offsets (B + 1,), starting at 0 and
    ending at total_q / total_k, on the device of ``query``. max_seqlen_q / max_seqlen_k: the longest
    sequence (None: computed; a larger value is accepted). Per sequence i: O_i = softmax(scale Q_i K_i^T
    (+ causal, top-left aligned)) V_i, as scaled_dot_product_attention on that sequence alone; ``scale``
    defaults to 1/sqrt(D); with ``enable_gqa`` each key/value head serves Hq/Hkv consecutive query heads.
    Rows of a sequence with no keys give 0. Works under torch.func.jvp and torch.autograd.forward_ad; the
    tangent output is differentiable with respect to the inputs and their tangents. Inside ``torch.autocast``
    the inputs are cast to the autocast dtype first (float64 is not cast). Under torch.compile (also
    ``fullgraph=True`` and dynamic shapes) the offsets are checked in the graph and ``max_seqlen_*`` default to
    the packed totals (see :mod:`.varlen_problem`); forward-mode AD there runs the dense masked naive math.
    """
    if torch.compiler.is_compiling():
        return _compiled_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, is_causal, scale, enable_gqa)
    primals, tangents = unpack_duals(query, key, value)
    p = make_varlen_problem(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            is_causal, scale, enable_gqa, tangents=tangents)
    name = resolve_varlen_backend(p)
    if name == "naive":
        return varlen_naive.attention(query, key, value, p)
    cu_q, cu_k = offsets_int32(cu_seqlens_q), offsets_int32(cu_seqlens_k)
    if any(t is not None for t in tangents):
        # Forward mode: one fused pass for O and tO whose backward runs through both outputs at once.
        tangents = [zeros_if_none(t, x) for t, x in zip(tangents, primals)]
        o, to, _, _ = apply_on_unpacked(VarlenJVPFunction, *primals, *tangents, cu_q, cu_k, p, name)
        return make_dual(o, to)
    o, _ = VarlenFunction.apply(query, key, value, cu_q, cu_k, p, name)
    return o


def _compiled_attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               is_causal, scale, enable_gqa) -> torch.Tensor:
    """:func:`attention_varlen` while torch.compile traces: the fused op without its jvp rule (which Dynamo
    refuses to trace); the naive backend and forward mode (whose tangent AOTAutograd would take as zero for
    the custom op) run the dense masked math, which reads no offset on the host."""
    p = make_varlen_problem(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            is_causal, scale, enable_gqa)
    name = resolve_varlen_backend(p)
    cu_q, cu_k = offsets_int32(cu_seqlens_q), offsets_int32(cu_seqlens_k)
    if name == "naive" or forward_mode_active():
        if name != "naive":
            warn_compiled_forward_mode("attention_varlen", str(query.dtype))
        return varlen_naive.masked_attention(query, key, value, cu_q, cu_k, p)
    o, _ = for_compile(VarlenFunction, VarlenCompiledFunction).apply(query, key, value, cu_q, cu_k, p, name)
    return o


@follows_autocast("q", "k", "v", tangents=(("tq", "q"), ("tk", "k"), ("tv", "v")))
def attention_varlen_jvp(q, k, v, tq, tk, tv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                         *, is_causal=False, scale=None, enable_gqa=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO): packed attention and its directional derivative along (tq, tk, tv), in one fused pass.

    Arguments as in :func:`attention_varlen`; each tangent has the shape, dtype and device of its primal
    (None means zero). Per sequence tO = tP V + P tV with tP = P * (tS - rowsum(P * tS)),
    tS = scale (tQ K^T + Q tK^T). Differentiable with respect to all six inputs. Inside ``torch.autocast``
    q, k, v are cast to the autocast dtype, each tangent with its primal.
    """
    p = make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                            enable_gqa, tangents=(tq, tk, tv))
    name = resolve_varlen_backend(p)
    if name == "naive":
        if torch.compiler.is_compiling():
            return varlen_naive.masked_attention_jvp(q, k, v, tq, tk, tv, offsets_int32(cu_seqlens_q),
                                                     offsets_int32(cu_seqlens_k), p)
        return varlen_naive.attention_jvp(q, k, v, tq, tk, tv, p)
    tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
    fn = for_compile(VarlenJVPFunction, VarlenJVPCompiledFunction)
    o, to, _, _ = fn.apply(q, k, v, tq, tk, tv, offsets_int32(cu_seqlens_q), offsets_int32(cu_seqlens_k), p, name)
    return o, to
