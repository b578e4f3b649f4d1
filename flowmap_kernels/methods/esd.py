"""Eulerian self-distillation (ESD, Boffi, Albergo & Vanden-Eijnden 2025).

Eulerian rule d_s F(x_s, s, t) + grad_x F(x_s, s, t) v(x_s, s) = 0 (Boffi et al., arXiv:2505.18825) with the
velocity replaced by the network's own v_hat = sg[V(x_s, s, s)] and a stop-gradient on the spatial
part of the Jacobian (arXiv:2505.18825, Eulerian methods). With F = x_s + (t - s) V:

    d_s F = -V + (t - s) d_s V,      grad_x F . v_hat = v_hat + (t - s) grad_x V . v_hat
    R = -V(x_s, s, t) + (t - s) d_s V(x_s, s, t) + sg[ v_hat + (t - s) grad_x V . v_hat ]
    L = E ||R||^2 + E_r || V(x_r, r, r) - (eps' - x0) ||^2

d_s V comes from torch.func.jvp along (0, 1, 0) and the loss backpropagates through it; the spatial
JVP along (v_hat, 0, 0) runs under torch.no_grad (stop-gradient). spatial_sg=False instead takes one
JVP along (v_hat, 1, 0) and backpropagates through all of it (no stop-gradient on the spatial part;
the call structure the nominal 10 FPE counts).
Times: (s, t) two uniform draws sorted, s >= t, all off the diagonal; r uniform. Unweighted MSE.
``cfg_dropout``: label dropout for classifier-free guidance (labels replaced by the model's null class
with that probability, drawn before anything else; arXiv:2207.12598); sample with sampling's standard
CFG combination (sampling.sample(..., guidance_scale=omega)).
"""
from __future__ import annotations

import torch

from ._common import (bcast, detached_logs, drop_labels, interpolate, jvp, merge_cfg, randn_like, sample_pair,
                      sample_times, self_or_teacher, sq_err)

NAME = "esd"
NOMINAL_FPE = 10
CALLS = ("stopped F (v_hat) + J (spatial, no grad) + J + BJ (d_s V) + flow-matching F + B; "
         "spatial_sg=False: stopped F + J + BJ + F + B")
TEACHER = "self"
SAMPLER = "flowmap"
DEFAULTS = {"time_dist": "uniform", "time_mu": 0.0, "time_sigma": 1.0, "ratio_neq": 1.0,
            "fm_time_dist": "uniform", "fm_time_mu": 0.0, "fm_time_sigma": 1.0,
            "eul_weight": 1.0, "fm_weight": 1.0, "spatial_sg": True, "cfg_dropout": 0.0, "teacher": None,
            "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    g = c["generator"]
    b = x0.shape[0]
    cond, _ = drop_labels(model, cond, c["cfg_dropout"], g)
    eps = randn_like(x0, g)
    s, t = sample_pair(b, c, device=x0.device, dtype=x0.dtype, generator=g)
    xs, _ = interpolate(x0, eps, s)
    dt = bcast(t - s, x0)
    zs, zx = torch.zeros_like(s), torch.zeros_like(xs)
    with torch.no_grad():
        v_hat = self_or_teacher(model, c["teacher"])(xs, s, s, y=cond)
    if c["spatial_sg"]:
        with torch.no_grad():
            _, jx = jvp(model, cond, (xs, s, t), (v_hat, zs, zs))
        V, dVds = jvp(model, cond, (xs, s, t), (zx, torch.ones_like(s), zs))
        R = -V + dt * dVds + (v_hat + dt * jx)
    else:
        V, dV = jvp(model, cond, (xs, s, t), (v_hat, torch.ones_like(s), zs))
        R = -V + dt * dV + v_hat
    eul = sq_err(R).mean()
    r = sample_times(b, c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=g)
    xr, vr = interpolate(x0, randn_like(x0, g), r)
    fm = sq_err(model(xr, r, r, y=cond), vr).mean()
    lo = c["eul_weight"] * eul + c["fm_weight"] * fm
    return lo, detached_logs(loss=lo, eulerian=eul, fm=fm)
