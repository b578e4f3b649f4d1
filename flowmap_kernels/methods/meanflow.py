"""MeanFlow (Geng et al. 2025): Eulerian identity with the target under stop-gradient.

In the project convention (MeanFlow's u(z_t, r, t) has t = our source s, r = our target t):

    V(x_s, s, t) = v(x_s, s) + (t - s) dV/ds,   dV/ds = d_s V + grad_x V . v   (total derivative along x_s)
    L = E sg[w] || V(x_s, s, t) - sg[ v + (t - s) dV/ds ] ||^2

with the marginal velocity v replaced by the conditional one, eps - x0 (marginal-from-conditional
learning: valid because the target is linear in v, evaluated at x_s, and under stop-gradient;
arXiv:2505.13447). dV/ds is one torch.func.jvp of the model along (x, s, t) -> (v, 1, 0).
``velocity="batch"`` takes for v instead the marginal velocity of the minibatch's empirical
distribution (_common.velocity; "Stable Target Field", Xu et al. 2023), in the tangent and the target:
the same marginal velocity with far less variance (self-normalised, so consistent: its bias vanishes
as the batch grows). The 2D preset uses it: checkerboard one-step SWD over six seeds 0.045 -> 0.036
(with the preset's other changes), and the 2- and 4-step samples stop collapsing onto the squares'
centres.

Stop-gradient: the whole target, i.e. the JVP's tangent output. The JVP's primal output IS the
prediction V(x_s, s, t): it keeps its autograd graph, the tangent is detached, so the backward runs
through the primal only and never through the JVP (J + B = 4 FPE, not J + BJ). (The tangent's graph
is recorded during the forward and freed when the detached tangent goes out of scope.)

Weighting: adaptive sg[w] = 1 / (||Delta||^2 + c)^p, loss w ||Delta||^2, with ||Delta||^2 the
per-sample SUM of squared errors (``adaptive_reduce="sum"``, MeanFlow's published code; p = 1, c = 1e-3)
or, with ``adaptive_reduce="mean"``, the per-dimension mean (the 2D preset: on D-dimensional samples c on
the mean is c * D on the sum, e.g. c = 1e-3 on 32x32x4 latents would act like c ~ 4).
Times: s, t two logit-normal(-0.4, 1.0) draws sorted (s >= t); a fraction 1 - ratio_neq of the pairs gets
t = s (MeanFlow's best ImageNet setting: 25% with r != t).

Classifier-free guidance (MeanFlow, arXiv:2505.13447, section 4.2 and its improved-CFG appendix), off by
default: ``cfg_dropout`` replaces labels by the model's null class with that probability (the paper: 0.1);
``cfg_scale`` omega != 1 or ``cfg_kappa`` != 0 trains the guided field directly: the velocity v (JVP
tangent and target) becomes

    v_g = omega v + kappa sg[V(x_s, s, s | c)] + (1 - omega - kappa) sg[V(x_s, s, s | null)]

(the paper's u^cfg(z_t, t, t) is our V(x_s, s, s), its instantaneous velocity; effective guidance scale
omega / (1 - kappa); kappa = 0 is v_g = omega (eps - x0) + (1 - omega) u_uncond), for conditional
examples whose source time s lies in ``cfg_interval`` [lo, hi] (the paper's guidance interval on its t =
our s); dropped-label examples and times outside keep v. The two (one when kappa = 0) extra forwards
run under no_grad. One-step sampling of such a model needs no guidance at test time.
Random draws in order: label dropout (only when cfg_dropout > 0 and labels are given), noise, times.
Source: Geng et al., arXiv:2505.13447 (MeanFlow; f, dfdt = jvp(f_theta, (xt, s, t), (v, 0, 1)) in its own
convention).
"""
from __future__ import annotations

import torch

from ._common import (CALLS_JVP_PRIMAL, bcast, check_interval, detached_logs, eulerian_draws, jvp, merge_cfg,
                      null_label, weighted_err)

NAME = "meanflow"
NOMINAL_FPE = 4
CALLS = CALLS_JVP_PRIMAL
TEACHER = None
SAMPLER = "flowmap"
DEFAULTS = {"time_dist": "logit_normal", "time_mu": -0.4, "time_sigma": 1.0, "ratio_neq": 0.25,
            "adaptive_p": 1.0, "adaptive_c": 1e-3, "adaptive_reduce": "sum", "velocity": "conditional",
            "cfg_dropout": 0.0, "cfg_scale": 1.0, "cfg_kappa": 0.0, "cfg_interval": [0.0, 1.0], "generator": None}


def guided_velocity(model, xs, s, v, cond, dropped, c):
    """MeanFlow's guided velocity v_g (module docstring) under no_grad; v where guidance does not apply."""
    lo, hi = check_interval(c)
    omega, kappa = float(c["cfg_scale"]), float(c["cfg_kappa"])
    with torch.no_grad():
        null = torch.full_like(cond, null_label(model, "cfg_scale"))
        vg = omega * v + (1.0 - omega - kappa) * model(xs, s, s, y=null)
        if kappa != 0.0:
            vg = vg + kappa * model(xs, s, s, y=cond)
        use = (s >= lo) & (s <= hi)
        if dropped is not None:
            use = use & ~dropped
        return torch.where(bcast(use, v), vg, v)


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    cond_in, dropped, s, t, xs, v = eulerian_draws(model, x0, cond, c)
    if cond is not None and (c["cfg_scale"] != 1.0 or c["cfg_kappa"] != 0.0):
        v = guided_velocity(model, xs, s, v, cond, dropped, c)
    # stop-gradient on the target: no backward through the JVP
    V, dV = jvp(model, cond_in, (xs, s, t), (v, torch.ones_like(s), torch.zeros_like(t)), tangent_grad=False)
    target = v + bcast(t - s, x0) * dV
    werr, err = weighted_err(V, target, c["adaptive_p"], c["adaptive_c"], c["adaptive_reduce"])
    lo = werr.mean()
    return lo, detached_logs(loss=lo, mse=err.mean())
