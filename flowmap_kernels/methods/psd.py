"""Progressive self-distillation (PSD, Boffi et al. 2025): composition over arbitrary splits, plus flow matching.

The flow map composes, F(x_s, s, t) = F(F(x_s, s, u), u, t) for s >= u >= t; written in the average
velocity (project convention, F = x + (t - s) V) with the split u = t + gamma (s - t):

    x_u   = x_s - (s - u) V_sg(x_s, s, u)
    V_hat = (1 - gamma) V_sg(x_s, s, u) + gamma V_sg(x_u, u, t)
    L = E_sc || V(x_s, s, t) - sg[V_hat] ||^2 + E_fm || V(x_r, r, r) - (eps - x0) ||^2

Shortcut models are the special case gamma = 1/2 on a dyadic grid of step sizes; PSD (Boffi et al.,
arXiv:2505.18825, the "progressive" family; the self-distillation form of SplitMeanFlow)
takes any split. The loss on V is the flow-map loss ||F - F_hat||^2 divided by (s - t)^2. No JVP.
V_sg: the current weights under torch.no_grad (self-teacher) or the given teacher.
Times: (s, t) two draws from time_dist sorted (s >= t), gamma ~ uniform(0, 1); a fraction sc_fraction
of the batch gets the consistency term, the rest flow matching with r ~ uniform (shared body with
shortcut: methods/_compositional.py). Cost on the full batch: 2 stopped F + F + B + flow-matching
F + B = 8 FPE (docs/math.md section 4).
``cfg_dropout``: label dropout for classifier-free guidance (_common.drop_labels, drawn first); sampling
applies the standard CFG combination (methods GUIDANCE "cfg").
"""
from __future__ import annotations

import torch

from ._common import merge_cfg, rng, sample_times
from ._compositional import compositional_loss

NAME = "psd"
NOMINAL_FPE = 8
CALLS = "2 stopped F (two hops) + F + B (consistency part) + flow-matching F + B"
TEACHER = "self"
SAMPLER = "flowmap"
DEFAULTS = {"time_dist": "uniform", "time_mu": 0.0, "time_sigma": 1.0, "sc_fraction": 0.25, "sc_weight": 1.0,
            "cfg_dropout": 0.0, "teacher": None, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)

    def sample_hops(n, g, **kw):
        a, b = (sample_times(n, c["time_dist"], c["time_mu"], c["time_sigma"], generator=g, **kw) for _ in range(2))
        s, t = torch.maximum(a, b), torch.minimum(a, b)
        gamma = torch.rand(n, **rng(g), **kw)
        u = t + gamma * (s - t)
        return s, u, t, u, t, 1 - gamma

    return compositional_loss(model, x0, cond, c, sample_hops)
