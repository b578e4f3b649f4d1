"""Terminal Velocity Matching (TVM, Zhou et al. 2025): Lagrangian consistency, backprop through the JVP.

Terminal velocity condition (Zhou et al., arXiv:2511.19797; Lagrangian rule of arXiv:2505.18825)
in the project convention:
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
Times (``time_dist="tvm"``, the paper's released loss, converted: its t is our source s, its s our
target t): the gap s - t = sigmoid(N(gap_mu = -0.8, gap_sigma = 1)), the target t ~ logit-normal(
time_mu = -0.4, time_sigma = 1) truncated to t <= 1 - gap, s = t + gap; the flow-matching time r ~
logit-normal(fm_time_mu = -0.4, 1). ``time_dist="uniform"`` (the 2D preset, with fm_time_mu = 0): (s, t)
two uniform draws sorted, r ~ logit-normal(0, 1). All pairs have t != s (the diagonal is trained by the
flow-matching term). Unweighted MSE (adaptive_p = 0).
Teacher: TVM keeps two EMAs of the weights (arXiv:2511.19797), a fast one (decay 0.99,
TEACHER_EMA_DECAY) as the teacher and a slow one (0.9999, EVAL_EMA_DECAY) for evaluation; the trainer
passes the teacher as cfg teacher= and keeps both (training/loop.py, --ema-decay / --eval-ema-decay; the
2D preset keeps one EMA, 0.995, for both, as its tables were measured).

Classifier-free guidance (TVM's scaled guidance, arXiv:2511.19797 and its released code; off by
default): ``cfg_dropout`` replaces labels by the null class (paper 0.1; a dropped example trains with
omega = 1); ``cfg_scale`` omega (or per example uniform in ``cfg_scale_range`` [min, max]) is a model
input (model(..., w=omega); needs a model with a guidance input) and, with ``scale_param`` (the paper's
scaled parameterisation), the network output is multiplied by omega: V_w = omega net(x, s, t | c, omega).
Then, with V_T the teacher,

    L = E || (d/dt F_w(x_s, s, t) - omega sg[V_T(sg F_w(x_s, s, t), t, t | c, omega)]) / omega ||^2
      + E || (V_w(x_r, r, r) - [omega (eps' - x0) + (1 - omega) sg V_T(x_r, r, r | null, 1)]) / omega ||^2

(the second term regresses onto the guided velocity; dividing by omega keeps the loss scale of every
guidance strength alike). Sampling: sampling.sample(..., guidance_scale=omega) multiplies the output by
omega for this method (GUIDANCE = "scaled_input"), one forward per step.
Random draws in order: label dropout (only when cfg_dropout > 0 and labels given), noise, times (tvm:
one normal, one uniform), the guidance scales (only with cfg_scale_range), r, noise'.
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
TEACHER_EMA_DECAY = 0.99  # the paper's teacher EMA (arXiv:2511.19797)
EVAL_EMA_DECAY = 0.9999  # the paper's separate evaluation EMA (arXiv:2511.19797)
SAMPLER = "flowmap"
GUIDANCE = "scaled_input"
DEFAULTS = {"time_dist": "tvm", "time_mu": -0.4, "time_sigma": 1.0, "gap_mu": -0.8, "gap_sigma": 1.0,
            "ratio_neq": 1.0, "fm_time_dist": "logit_normal", "fm_time_mu": -0.4, "fm_time_sigma": 1.0,
            "lag_weight": 1.0, "fm_weight": 1.0, "adaptive_p": 0.0, "adaptive_c": 1e-3,
            "cfg_dropout": 0.0, "cfg_scale": 1.0, "cfg_scale_range": None, "scale_param": True,
            "teacher": None, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    return lagrangian_loss(model, x0, cond, merge_cfg(DEFAULTS, cfg, NAME, x0))
