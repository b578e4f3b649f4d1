"""Public attention functions: a drop-in for scaled_dot_product_attention and its explicit JVP form."""
from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD

from . import naive
from ..backends import get_backend
from .autograd import AttentionCompiledFunction, AttentionFunction, AttentionJVPFunction, _check_mask_tangent
from .problem import AttentionProblem, make_problem
from .registry import ATTENTION


def resolve_backend(problem: AttentionProblem, backend: Optional[str] = None) -> str:
    """The single dispatch point: the backend name that will run ``problem``.

    While torch.compile traces, the choice is made eagerly (see :func:`_resolve_constant`) and baked
    into the graph as a constant.
    """
    if torch.compiler.is_compiling():
        return _resolve_constant(backend or get_backend(), **problem.as_dict())
    return ATTENTION.resolve(backend, **problem.as_dict()).backend


@torch.compiler.assume_constant_result
def _resolve_constant(name: str, **problem) -> str:
    """``ATTENTION.resolve`` run outside Dynamo's trace: the first resolution probes availability with
    importlib (e.g. ``import triton``), which Dynamo cannot trace (a graph break under fullgraph=True).
    The name is a constant of the compiled graph; guards still cover shapes, dtype and device."""
    return ATTENTION.resolve(name, **problem).backend


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False) -> torch.Tensor:
    """scaled_dot_product_attention with forward-mode AD and backward through the tangent.

    query (B, Hq, Lq, D), key (B, Hkv, Lk, D), value (B, Hkv, Lk, Dv) -> (B, Hq, Lq, Dv), same dtype.
    O = softmax(scale * Q K^T + mask) V; ``scale`` defaults to 1/sqrt(D). ``attn_mask`` broadcasts to
    (B, Hq, Lq, Lk): bool (True = may attend) or float (added to the logits). ``is_causal`` is top-left
    aligned. With ``enable_gqa`` each key/value head serves Hq/Hkv consecutive query heads. Rows with no
    allowed key give 0. Works under torch.func.jvp and torch.autograd.forward_ad; the tangent output is
    differentiable with respect to the inputs and their tangents.
    """
    p = make_problem(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    name = resolve_backend(p)
    if name == "naive":
        return naive.attention(query, key, value, p)
    if torch.compiler.is_compiling():
        if torch.autograd.forward_ad._current_level >= 0:
            # Forward-mode AD inside a compiled region (torch.func.jvp traced by torch.compile, or dual
            # tensors fed to a compiled function): AOTAutograd would take the custom ops' tangent as ZERO,
            # silently. The naive math is traced op by op with exact tangents (O(N^2) memory).
            return naive.attention(query, key, value, p)
        o, _ = AttentionCompiledFunction.apply(query, key, value, attn_mask, p, name)
        return o
    duals = [fwAD.unpack_dual(x) for x in (query, key, value)]
    if any(d.tangent is not None for d in duals):
        # Forward mode (torch.func.jvp or forward_ad): one fused pass for O and tO, whose backward runs
        # through both outputs at once, instead of a forward followed by the JVP rule's own pass.
        if attn_mask is not None:
            _check_mask_tangent(fwAD.unpack_dual(attn_mask).tangent)
        primals = [d.primal for d in duals]
        tangents = [torch.zeros_like(d.primal) if d.tangent is None else d.tangent for d in duals]
        o, to, _, _ = AttentionJVPFunction.apply(*primals, *tangents, attn_mask, p, name)
        return fwAD.make_dual(o, to)
    o, _ = AttentionFunction.apply(query, key, value, attn_mask, p, name)
    return o


def attention_jvp(q, k, v, tq, tk, tv, *, attn_mask=None, is_causal=False, scale=None,
                  enable_gqa=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO): attention and its directional derivative along (tq, tk, tv), in one fused pass.

    Shapes as in :func:`attention`; each tangent has the shape, dtype and device of its primal (None
    means zero). tO = tP V + P tV with tP = P * (tS - rowsum(P * tS)), tS = scale (tQ K^T + Q tK^T).
    Differentiable with respect to all six inputs (the backward runs through both outputs at once).
    """
    p = make_problem(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa, tangents=(tq, tk, tv))
    name = resolve_backend(p)
    if name == "naive":
        return naive.attention_jvp(q, k, v, tq, tk, tv, p)
    tq = torch.zeros_like(q) if tq is None else tq
    tk = torch.zeros_like(k) if tk is None else tk
    tv = torch.zeros_like(v) if tv is None else tv
    o, to, _, _ = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, attn_mask, p, name)
    return o, to
