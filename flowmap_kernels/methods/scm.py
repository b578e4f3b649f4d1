"""Continuous-time consistency training (sCM, Lu & Song 2024) as a flow map with target time 0.

Consistency function f(x_s, s) = F(x_s, s, 0) = x_s - s V(x_s, s, 0) (f(x, 0) = x by construction).
The continuous-time CT gradient (Lu & Song, arXiv:2410.11081) is E[ w grad_theta f_theta^T sg(df/ds) ] with
the total derivative along the trajectory, the marginal velocity replaced by eps - x0 (consistency
*training*, from scratch):

    df/ds = (eps - x0) - V - s dV/ds,   dV/ds = d_s V + grad_x V . (eps - x0)   (one torch.func.jvp)
    g = r * df/ds / (||df/ds|| + c)                               (sCM tangent normalisation, c = 0.1)
    L = E || f_theta - sg[f_theta - g] ||^2  =  E || -s (V - sg[V]) + sg[g] ||^2

whose gradient w.r.t. f_theta is 2 g (the Delta s -> 0 limit of the discrete CT loss
||f(x_s, s) - sg f(x_{s - ds}, s - ds)||^2). Everything but the V outside sg is stopped (theta^- = sg(theta),
no EMA, as sCM): the JVP's tangent is detached, its primal output carries the graph, so the backward
runs through the primal only (J + B = 4 FPE). ``tangent warmup``: the s dV/ds term is scaled by
min(1, step / warmup_steps) (sCM's r); the trainer passes ``step``.

Times: sCM samples log(sigma) ~ N(P_mean = -1.0, P_std = 1.4) with sigma the noise-to-signal ratio; in
our schedule sigma = s / (1 - s), so s ~ logit-normal(-1.0, 1.4). The learned adaptive weighting of
sCM is replaced by the tangent normalisation alone. ``velocity="batch"``: eps - x0 above becomes the
minibatch's marginal velocity (_common.velocity, as MeanFlow's option; no gain measured on
checkerboard). Multi-step sampling re-noises (SAMPLER = "consistency"). Source: Lu & Song, arXiv:2410.11081
(continuous-time CM; FACM = MeanFlow at t = 0), Song et al., arXiv:2303.01469 (CT).
"""
from __future__ import annotations

import torch

from ._common import bcast, detached_logs, interpolate, jvp, merge_cfg, randn_like, sample_times, velocity

NAME = "scm"
NOMINAL_FPE = 4
CALLS = "J (primal is the prediction) + B through the primal; tangent detached"
TEACHER = None
SAMPLER = "consistency"
DEFAULTS = {"time_dist": "logit_normal", "time_mu": -1.0, "time_sigma": 1.4, "tangent_c": 0.1,
            "warmup_steps": 0, "step": None, "velocity": "conditional", "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME)
    gen = c["generator"]
    eps = randn_like(x0, gen)
    s = sample_times(x0.shape[0], c["time_dist"], c["time_mu"], c["time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=gen)
    t = torch.zeros_like(s)
    xs, _ = interpolate(x0, eps, s)
    v = velocity(c["velocity"], s, x0, eps, cond)
    V, dV = jvp(model, cond, (xs, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
    r = 1.0
    if c["warmup_steps"] and c["step"] is not None:
        r = min(1.0, float(c["step"]) / float(c["warmup_steps"]))
    sb = bcast(s, x0)
    with torch.no_grad():
        dfds = v - V - r * sb * dV
        norm = dfds.reshape(dfds.shape[0], -1).norm(dim=1)
        g = dfds / bcast(norm + c["tangent_c"], x0)
    diff = -sb * (V - V.detach()) + g
    lo = diff.pow(2).reshape(diff.shape[0], -1).mean(1).mean()
    return lo, detached_logs(loss=lo, tangent_norm=norm.mean())
