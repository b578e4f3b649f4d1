"""Lagrangian self-distillation (LSD, Boffi, Albergo & Vanden-Eijnden 2025).

In the project convention (Boffi et al., arXiv:2505.18825, Lagrangian self-distillation):

    L = E || d/dt F(x_s, s, t) - sg[ V(F(x_s, s, t), t, t) ] ||^2 + E_r || V(x_r, r, r) - (eps' - x0) ||^2
    d/dt F(x_s, s, t) = V(x_s, s, t) + (t - s) d_t V(x_s, s, t)

Same computation as TVM; the differences are the teacher (the current weights under stop-gradient,
a self-teacher, TEACHER = "self"; no EMA) and the defaults. The derivative term is not stopped:
the loss backpropagates through the torch.func.jvp along (0, 0, 1).
Times: (s, t) two uniform draws sorted (s >= t, all off the diagonal); r uniform. Unweighted MSE.
Cost: J + BJ + stopped self-teacher F + flow-matching F + B = 10 FPE.
``cfg_dropout``: label dropout for classifier-free guidance (labels replaced by the model's null class
with that probability, drawn first; arXiv:2207.12598); sample with sampling's standard CFG combination.
"""
from __future__ import annotations

from ._common import merge_cfg
from ._lagrangian import lagrangian_loss

NAME = "lsd"
NOMINAL_FPE = 10
CALLS = "J + BJ (through the JVP) + stopped self-teacher F + flow-matching F + B"
TEACHER = "self"
SAMPLER = "flowmap"
DEFAULTS = {"time_dist": "uniform", "time_mu": 0.0, "time_sigma": 1.0, "ratio_neq": 1.0,
            "fm_time_dist": "uniform", "fm_time_mu": 0.0, "fm_time_sigma": 1.0,
            "lag_weight": 1.0, "fm_weight": 1.0, "adaptive_p": 0.0, "adaptive_c": 1e-3,
            "cfg_dropout": 0.0, "teacher": None, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    return lagrangian_loss(model, x0, cond, merge_cfg(DEFAULTS, cfg, NAME, x0))
