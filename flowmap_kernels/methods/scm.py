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
our schedule sigma = s / (1 - s), so s ~ logit-normal(-1.0, 1.4).
Adaptive weighting (``adaptive_weighting=True``, sCM's default, arXiv:2410.11081 section 4): a learned
scalar w_phi(s) per time (models.TimeWeight, attached as ``model.loss_weight`` by prepare_model, trained
with the model) and the per-sample loss exp(w_phi(s)) * ||diff||^2 / D - w_phi(s), whose optimum
exp(-w) = E||diff||^2 / D balances the loss across times. False: the tangent normalisation alone (the 2D
preset; what this module trained with before).
TrigFlow parameterisation (``param="trigflow"``, sCM's): the network F predicts TrigFlow's velocity and
V(x_s, s, 0) is derived from it (models.TrigFlowParam; prepare_model wraps the network; ``sigma_d`` the
data standard deviation of TrigFlow, 0.5 in sCM for images). The loss itself is unchanged: it
differentiates V through the wrapper.
``cfg_dropout``: label dropout for classifier-free guidance (drawn first; null class).
``velocity="batch"``: eps - x0 above becomes the minibatch's marginal velocity (_common.velocity, as
MeanFlow's option; no gain measured on checkerboard). Multi-step sampling re-noises (SAMPLER =
"consistency"). Source: Lu & Song, arXiv:2410.11081 (continuous-time CM; FACM = MeanFlow at t = 0), Song et
al., arXiv:2303.01469 (CT).
"""
from __future__ import annotations

import torch

from ._common import (CALLS_JVP_PRIMAL, bcast, detached_logs, drop_labels, interpolate, jvp, merge_cfg, randn_like,
                      sample_times, velocity)

NAME = "scm"
NOMINAL_FPE = 4
CALLS = CALLS_JVP_PRIMAL
TEACHER = None
SAMPLER = "consistency"
DEFAULTS = {"time_dist": "logit_normal", "time_mu": -1.0, "time_sigma": 1.4, "tangent_c": 0.1,
            "warmup_steps": 0, "step": None, "velocity": "conditional", "adaptive_weighting": True,
            "param": "flowmap", "sigma_d": 1.0, "cfg_dropout": 0.0, "generator": None}
PARAMS = ("flowmap", "trigflow")


def prepare_model(model, cfg=None):
    """The network as this configuration trains it: wrapped in models.TrigFlowParam when
    param="trigflow", with a models.TimeWeight attached as ``model.loss_weight`` when
    adaptive_weighting (a new submodule, so the optimizer, EMA and checkpoint carry it). Call once,
    after building the network and before creating the optimizer. Returns the (possibly new) module."""
    from ..models import TimeWeight, TrigFlowParam
    c = merge_cfg(DEFAULTS, dict(cfg or {}), NAME)
    if c["param"] not in PARAMS:
        raise ValueError(f"param: expected one of {list(PARAMS)}, got {c['param']!r}")
    if c["param"] == "trigflow" and not isinstance(model, TrigFlowParam):
        model = TrigFlowParam(model, c["sigma_d"])
    if c["adaptive_weighting"] and getattr(model, "loss_weight", None) is None:
        p = next(model.parameters(), None)
        model.loss_weight = TimeWeight().to(**({} if p is None else dict(device=p.device, dtype=p.dtype)))
    return model


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    gen = c["generator"]
    if c["param"] not in PARAMS:
        raise ValueError(f"param: expected one of {list(PARAMS)}, got {c['param']!r}")
    if c["param"] == "trigflow" and not hasattr(model, "sigma_d"):
        raise ValueError("param: 'trigflow' needs the network wrapped by methods.scm.prepare_model "
                         "(models.TrigFlowParam)")
    if c["adaptive_weighting"] and getattr(model, "loss_weight", None) is None:
        raise ValueError("adaptive_weighting: the model has no loss_weight module; call methods.scm.prepare_model "
                         "(or prepare_model in flowmap_kernels.methods) on it first, or pass adaptive_weighting=False")
    cond_orig = cond
    cond, dropped = drop_labels(model, cond, c["cfg_dropout"], gen)
    eps = randn_like(x0, gen)
    s = sample_times(x0.shape[0], c["time_dist"], c["time_mu"], c["time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=gen)
    t = torch.zeros_like(s)
    xs, _ = interpolate(x0, eps, s)
    v = velocity(c["velocity"], s, x0, eps, cond_orig, free=dropped)
    V, dV = jvp(model, cond, (xs, s, t), (v, torch.ones_like(s), torch.zeros_like(t)), tangent_grad=False)
    if not c["warmup_steps"] >= 0:  # a negative one flipped the sign of the s dV/ds term
        raise ValueError(f"warmup_steps: expected an integer >= 0 (0: off), got {c['warmup_steps']!r}")
    r = 1.0
    if c["warmup_steps"] and c["step"] is not None:
        r = min(1.0, float(c["step"]) / float(c["warmup_steps"]))
    sb = bcast(s, x0)
    with torch.no_grad():
        dfds = v - V - r * sb * dV
        norm = dfds.reshape(dfds.shape[0], -1).norm(dim=1)
        g = dfds / bcast(norm + c["tangent_c"], x0)
    diff = -sb * (V - V.detach()) + g
    per = diff.pow(2).reshape(diff.shape[0], -1).mean(1)
    if c["adaptive_weighting"]:
        lw = model.loss_weight(s)
        lo = (torch.exp(lw) * per - lw).mean()
        return lo, detached_logs(loss=lo, tangent_norm=norm.mean(), mse=per.mean(), log_weight=lw.mean())
    lo = per.mean()
    return lo, detached_logs(loss=lo, tangent_norm=norm.mean(), mse=per.mean())
