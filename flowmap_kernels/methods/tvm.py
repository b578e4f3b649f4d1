"""Terminal Velocity Matching (TVM, Zhou et al. 2025): Lagrangian consistency, backprop through the JVP.

Terminal velocity condition (Zhou et al., arXiv:2511.19797; Lagrangian rule of arXiv:2505.18825) in the project convention:
    d/dt F(x_s, s, t) = v(F(x_s, s, t), t),   d/dt F = V(x_s, s, t) + (t - s) d_t V(x_s, s, t).
From scratch, v at the terminal point is the network's own velocity under stop-gradient, evaluated with
EMA weights theta^- ("stop-gradient on the weights for some of the model invocations, and
even EMA weights for one of them"), plus a flow-matching term:

    L = lag_weight * E || V + (t - s) d_t V - sg[ V_{theta^-}( sg[F(x_s, s, t)], t, t ) ] ||^2
      + fm_weight  * E_r || V(x_r, r, r) - (eps' - x0) ||^2

NO stop-gradient on the derivative term: d_t V comes from torch.func.jvp along (0, 0, 1) and the loss
backpropagates through the JVP (reverse-over-forward; attention runs AttentionJVPFunction's backward).
Stopped: the terminal point and the teacher evaluation (EMA weights when the trainer passes teacher=,
else the current weights under torch.no_grad).
Times: (s, t) two uniform draws sorted, s >= t, all pairs with t != s (ratio_neq = 1: the diagonal is
trained by the flow-matching term); r ~ logit-normal(0, 1). Unweighted MSE (adaptive_p = 0).
The TVM paper's Lipschitz/normalisation tweaks of the architecture are not part of this loss.
Cost: J + BJ + stopped/EMA teacher F + flow-matching F + B = 10 FPE (docs/math.md section 4).
"""
from __future__ import annotations

from ._common import merge_cfg
from ._lagrangian import lagrangian_loss

NAME = "tvm"
NOMINAL_FPE = 10
CALLS = "J + BJ (through the JVP) + EMA/stopped teacher F + flow-matching F + B"
TEACHER = "ema"
SAMPLER = "flowmap"
DEFAULTS = {"time_dist": "uniform", "time_mu": 0.0, "time_sigma": 1.0, "ratio_neq": 1.0,
            "fm_time_dist": "logit_normal", "fm_time_mu": 0.0, "fm_time_sigma": 1.0,
            "lag_weight": 1.0, "fm_weight": 1.0, "adaptive_p": 0.0, "adaptive_c": 1e-3,
            "teacher": None, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    return lagrangian_loss(model, x0, cond, merge_cfg(DEFAULTS, cfg, NAME))
