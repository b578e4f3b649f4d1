"""Shortcut models (Frans et al. 2024): compositional self-consistency plus flow matching.

Shortcut models put noise at t = 0 and step forward by d; converted to the project convention (noise
at 1, steps go down in time), with step 2h from source s to target s - 2h:

    x_mid = x_s - h V_sg(x_s, s, s - h)
    V_hat = ( V_sg(x_s, s, s - h) + V_sg(x_mid, s - h, s - 2h) ) / 2
    L = E_sc || V(x_s, s, s - 2h) - sg[V_hat] ||^2 + E_fm || V(x_r, r, r) - (eps - x0) ||^2

(seed 001, "Compositional methods"; seed 002, "Shortcut Models"). V_sg: the current weights under
torch.no_grad (a self-teacher; no EMA) or the given teacher. No JVP. Step sizes 2h = 2^-k,
k uniform in {0, ..., log2(M) - 1} (M = 128 base steps, smallest 2h = 2/M); the source s is uniform on
the grid {2h, 4h, ..., 1}; for the smallest step the two halves use the instantaneous velocity (h -> 0
as in the paper's d = 0 targets). A fraction sc_fraction of the batch (paper: 1/4) gets the consistency
term, the rest flow matching with r ~ uniform. Both terms in one forward over the concatenated batch.
Cost on the full batch: 2 stopped F + F + B + flow-matching F + B = 8 FPE.
"""
from __future__ import annotations

import math

import torch

from ._common import bcast, detached_logs, interpolate, merge_cfg, randn_like, self_or_teacher, sq_err

NAME = "shortcut"
NOMINAL_FPE = 8
CALLS = "2 stopped F (two half steps) + F + B (consistency part) + flow-matching F + B"
TEACHER = "self"
SAMPLER = "flowmap"
DEFAULTS = {"base_steps": 128, "sc_fraction": 0.25, "sc_weight": 1.0, "teacher": None, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME)
    g = c["generator"]
    b = x0.shape[0]
    M = int(c["base_steps"])
    if M < 2 or M & (M - 1):
        raise ValueError(f"base_steps: expected a power of two >= 2, got {M}")
    nsc = int(round(b * c["sc_fraction"]))
    if not 0 <= nsc <= b:
        raise ValueError(f"sc_fraction: expected a fraction in [0, 1], got {c['sc_fraction']}")
    kw = dict(device=x0.device, dtype=x0.dtype)
    eps = randn_like(x0, g)
    # flow-matching part (first b - nsc samples): r uniform, target time = r
    r = torch.rand(b - nsc, generator=g, **kw)
    # consistency part: 2h = 2^-k, s on the grid of multiples of 2h
    levels = int(math.log2(M))
    k = torch.randint(0, levels, (nsc,), generator=g, device=x0.device)
    two_h = torch.pow(2.0, -k.to(x0.dtype))
    n_cells = torch.round(1.0 / two_h)
    j = torch.floor(torch.rand(nsc, generator=g, **kw) * n_cells) + 1  # 1..n_cells
    s_sc = (j * two_h).clamp(max=1.0)
    h = two_h / 2
    s = torch.cat([r, s_sc])
    t = torch.cat([r, s_sc - two_h])
    xs, v = interpolate(x0, eps, s)
    xsc = xs[b - nsc:]
    ysc = None if cond is None else cond[b - nsc:]
    with torch.no_grad():
        T = self_or_teacher(model, c["teacher"])
        smallest = k == levels - 1
        t1 = torch.where(smallest, s_sc, s_sc - h)  # the smallest step uses instantaneous velocities
        v1 = T(xsc, s_sc, t1, y=ysc)
        x_mid = xsc - bcast(h, xsc) * v1
        sm = s_sc - h
        v2 = T(x_mid, sm, torch.where(smallest, sm, sm - h), y=ysc)
        v_hat = (v1 + v2) / 2
    pred = model(xs, s, t, y=cond)
    fm = sq_err(pred[: b - nsc], v[: b - nsc])
    sc = sq_err(pred[b - nsc:], v_hat)
    lo = (fm.sum() + c["sc_weight"] * sc.sum()) / b
    return lo, detached_logs(loss=lo, fm=fm.mean() if fm.numel() else 0.0, sc=sc.mean() if sc.numel() else 0.0)
