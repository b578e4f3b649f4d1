"""Shared body of the compositional losses (shortcut, psd): flow matching plus two-hop self-consistency.

A sampler picks, for the consistency part of the batch, source s, intermediate u and target t
(s >= u >= t), the target times a1, a2 the two hops are evaluated at (u and t; shortcut's smallest step
uses the instantaneous velocity, a1 = s, a2 = u) and the weight w = (s - u) / (s - t). Then

    x_u   = x_s - (s - u) V_sg(x_s, s, a1)
    V_hat = w V_sg(x_s, s, a1) + (1 - w) V_sg(x_u, u, a2)     (F(x_s, s, t) = F(F(x_s, s, u), u, t) in V)
    L = [ sum_fm || V(x_r, r, r) - (eps - x0) ||^2 + sc_weight sum_sc || V(x_s, s, t) - sg[V_hat] ||^2 ] / B

V_sg: the teacher (EMA weights) or the current weights under torch.no_grad. Both terms run in one forward
over the concatenated batch; a fraction sc_fraction of the batch gets the consistency term, the rest
flow matching with r ~ uniform(0, 1). ``cfg_dropout``: label dropout (null class), drawn first.
"""
from __future__ import annotations

from typing import Callable

import torch

from ._common import bcast, detached_logs, drop_labels, interpolate, randn_like, rng, self_or_teacher, sq_err


def compositional_loss(model, x0, cond, c: dict, sample_hops: Callable):
    """The loss above. ``sample_hops(n, generator, **tensor_kw) -> (s, u, t, a1, a2, w)``, each (n,)."""
    g = c["generator"]
    b = x0.shape[0]
    if not 0.0 <= c["sc_fraction"] <= 1.0:  # the fraction itself (rounded, 1.4 of one example passed; NaN crashed)
        raise ValueError(f"sc_fraction: expected a fraction in [0, 1], got {c['sc_fraction']}")
    nsc = int(round(b * c["sc_fraction"]))
    kw = dict(device=x0.device, dtype=x0.dtype)
    cond, _ = drop_labels(model, cond, c["cfg_dropout"], g)
    eps = randn_like(x0, g)
    r = torch.rand(b - nsc, **rng(g), **kw)
    s_sc, u, t_sc, a1, a2, w = sample_hops(nsc, g, **kw)
    s = torch.cat([r, s_sc])
    t = torch.cat([r, t_sc])
    xs, v = interpolate(x0, eps, s)
    xsc = xs[b - nsc:]
    ysc = None if cond is None else cond[b - nsc:]
    with torch.no_grad():
        v_hat = xsc  # (no consistency example: round(B sc_fraction) = 0)
        if nsc:
            T = self_or_teacher(model, c["teacher"])
            v1 = T(xsc, s_sc, a1, y=ysc)
            x_mid = xsc - bcast(s_sc - u, xsc) * v1
            v2 = T(x_mid, u, a2, y=ysc)
            v_hat = bcast(w, xsc) * v1 + bcast(1 - w, xsc) * v2
    pred = model(xs, s, t, y=cond)
    fm = sq_err(pred[: b - nsc], v[: b - nsc])
    sc = sq_err(pred[b - nsc:], v_hat)
    lo = (fm.sum() + c["sc_weight"] * sc.sum()) / b
    return lo, detached_logs(loss=lo, fm=fm.mean() if fm.numel() else 0.0, sc=sc.mean() if sc.numel() else 0.0)
