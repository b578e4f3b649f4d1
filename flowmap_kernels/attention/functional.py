"""Public attention functions: a drop-in for scaled_dot_product_attention and its explicit JVP form."""
from __future__ import annotations

from typing import Optional

import torch

from . import naive
from .autograd import AttentionFunction, AttentionJVPFunction
from .problem import AttentionProblem, make_problem
from .registry import ATTENTION


def resolve_backend(problem: AttentionProblem, backend: Optional[str] = None) -> str:
    """The single dispatch point: the backend name that will run ``problem``."""
    return ATTENTION.resolve(backend, **problem.as_dict()).backend


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
