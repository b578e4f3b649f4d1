"""Backend "naive": attention as plain differentiable PyTorch ops (the reference).

Holds the full (B, H, Lq, Lk) score matrix. Every autograd mode works on it natively (torch.func.jvp,
forward_ad, double backward); low precisions are computed in float32 and cast back.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._autodiff import acc_dtype as _compute_dtype, zeros_if_none
from .problem import AttentionProblem


def attention_probs(q: torch.Tensor, k: torch.Tensor, p: AttentionProblem) -> torch.Tensor:
    """Row-softmax probabilities P (B, Hq, Lq, Lk) in the compute dtype; fully masked rows are 0."""
    ct = _compute_dtype(p.dtype)
    if p.group != 1:  # 0 when there are no query heads
        k = k.repeat_interleave(p.group, dim=1)
    s = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * p.scale
    if p.kv_len == 0:
        return s  # no key: the (B, Hq, Lq, 0) probabilities are empty and O = P V is zero (as in SDPA)
    allowed = None
    if p.mask_kind == "float":
        s = s + p.mask.to(ct)
    elif p.mask_kind == "bool":
        allowed = p.mask
    if p.is_causal:
        causal = torch.ones(p.q_len, p.kv_len, dtype=torch.bool, device=q.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    dead = (s == float("-inf")).all(dim=-1, keepdim=True)
    s = s.masked_fill(dead, 0.0)
    # explicit softmax: torch.softmax's forward-AD formula breaks reverse-over-forward under forward_ad
    e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
    return (e / e.sum(dim=-1, keepdim=True)).masked_fill(dead, 0.0)


def attention(q, k, v, p: AttentionProblem) -> torch.Tensor:
    """O = softmax(scale * Q K^T + mask) V, (B, Hq, Lq, Dv) in the input dtype."""
    probs = attention_probs(q, k, p)
    if p.group != 1:  # 0 when there are no query heads
        v = v.repeat_interleave(p.group, dim=1)
    return (probs @ v.to(probs.dtype)).to(p.dtype)


def attention_jvp(q, k, v, tq: Optional[torch.Tensor], tk, tv, p: AttentionProblem):
    """(O, tO) by the closed-form tangent (docs/math.md section 1), as differentiable plain ops."""
    ct = _compute_dtype(p.dtype)
    probs = attention_probs(q, k, p)
    kk, vv = k, v
    tq, tk, tv = zeros_if_none(tq, q), zeros_if_none(tk, k), zeros_if_none(tv, v)
    if p.group != 1:  # 0 when there are no query heads
        kk, vv, tk, tv = (x.repeat_interleave(p.group, dim=1) for x in (k, v, tk, tv))
    ts = (tq.to(ct) @ kk.to(ct).transpose(-2, -1) + q.to(ct) @ tk.to(ct).transpose(-2, -1)) * p.scale
    mu = (probs * ts).sum(dim=-1, keepdim=True)
    tp = probs * (ts - mu)
    o = probs @ vv.to(ct)
    to = tp @ vv.to(ct) + probs @ tv.to(ct)
    return o.to(p.dtype), to.to(p.tangent_dtype or p.dtype)
