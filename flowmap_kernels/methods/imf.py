"""Improved MeanFlow (iMF, Geng et al. 2025): the Eulerian identity read as a velocity reparameterisation.

In the project convention, with the model's own instantaneous velocity v_hat = V(x_s, s, s):

    W(x_s, s, t) = V(x_s, s, t) - (t - s) sg[ d_s V + grad_x V . sg[v_hat] ]
    L = E || W(x_s, s, t) - (eps - x0) ||^2

i.e. a flow-matching loss on W (iMF, arXiv:2512.02012). Sign: the
MeanFlow identity V = v + (t - s) dV/ds gives v = V - (t - s) dV/ds; some expositions write "+" when they swap
the sides (checked numerically against the exact flow map of Gaussian data; with "+" training diverged:
1-step SWD 0.48-0.66 on checkerboard, worse than noise). In iMF's own convention (source t, target r) the
compound velocity is u + (t - r) sg(du/dt), which is the "-" here. The bracket is one
torch.func.jvp along (x, s, t) -> (v_hat, 1, 0); its tangent is detached (stop-gradient), its primal
keeps its graph (it is V), so the backward runs through the primal only. v_hat is one extra forward
under torch.no_grad. At s = t the loss is plain flow matching on V(x, s, s).

Weighting: iMF keeps MeanFlow's adaptive weight with power p = 1 (``adaptive_p``), c = 1e-3, on the
per-sample sum of squared errors (``adaptive_reduce="sum"``; "mean" = per-dimension mean, the 2D preset
uses p = 0 with "mean", the plain MSE this module trained with before).
``velocity="batch"``: the regression target eps - x0 becomes the minibatch's marginal velocity
(_common.velocity, as MeanFlow's option; on checkerboard it did not help iMF: one-step SWD 0.084 -> 0.118).
Times: as MeanFlow (logit-normal(-0.4, 1.0) pairs, s >= t, ratio_neq of pairs with t != s).
Guidance as conditioning (iMF, arXiv:2512.02012, section 4; off by default): ``cfg_dropout`` replaces
labels by the null class (paper 0.1); ``cfg_omega_max`` > 0 samples a guidance scale per example,
omega in [1, 1 + cfg_omega_max] with density ~ omega^-cfg_beta (cfg_beta = 1: log-uniform), and feeds it
to the model as an input (model(..., w=omega); needs a model with ``guidance_dim``, e.g.
MLPFlowMap(guidance_dim=1 or 3)). With guidance_dim = 3 the guidance interval is an input too: t_min ~
U(0, 1/2), t_max ~ U(1/2, 1) per example (diagonal pairs: [0, 1]), w = [omega, t_min, t_max]; with
guidance_dim = 1 the interval is the fixed ``cfg_interval``. The regression target becomes the guided
velocity built from the model's own velocities (no_grad; omega_e = omega inside the interval, else 1):

    v_c = V(x_s, s, s | c, omega_e),   v_u = V(x_s, s, s | null, 1)
    v_g = v + (1 - 1 / omega_e) (v_c - v_u)

and v_c is also the JVP tangent v_hat (the conditional guided velocity is what the model transports);
dropped-label examples get omega = 1 and v_g = v. (The model's guided output v_c estimates
omega v_cond + (1 - omega) v_u, so v_g estimates the same field with the data's conditional velocity
in place of the model's: omega (eps - x0) + (1 - omega) v_u in expectation.) Sampling: pass the scale
to the model (sampling.sample(..., guidance_scale=omega)), one forward per step.
Random draws in order: label dropout (only when cfg_dropout > 0 and labels given), noise, times, then
(guidance on) the scales and (guidance_dim = 3) the interval ends t_min, t_max.
Auxiliary velocity head (iMF, arXiv:2512.02012; ``aux_head=True``, off by default so the 2D tables stand):
v_hat comes from a second output head of the network, v_aux(x_s, s, t), instead of the extra no-grad
forward V(x_s, s, s). The head shares the backbone and is trained by its own flow-matching term on the
same target (it learns to ignore t: the target does not depend on it):

    V, v_aux = model(x_s, s, t, aux=True)                     one forward, both heads, with grad
    dV       = sg[ d_s V + grad_x V . sg[v_aux] ]              torch.func.jvp along (sg[v_aux], 1, 0), no graph
    L = E sg[w] || V - (t - s) dV - v ||^2 + aux_weight * E || v_aux - v ||^2

(v the target above, guided when guidance is on: there v_c = sg[v_aux] and v_u is the null-label forward's
auxiliary head). Needs a network built with the head (MLPFlowMap / nn.DiT ``aux_velocity=True``; the
training loop builds it when aux_head is set). Calls: F (both heads, with grad) + J (no graph; its primal
is recomputed, so still 5 FPE) + B through the forward; the JVP keeps no autograd graph.
Not implemented: iMF's in-context (token) conditioning.
Source: Geng et al., arXiv:2512.02012; cost model docs/math.md section 4 (F + J + B = 5 FPE).
"""
from __future__ import annotations

import torch

from ._common import (bcast, call, check_interval, detached_logs, eulerian_draws, jvp, merge_cfg, null_label,
                      require_guidance_input, sample_guidance_scale, sq_err, weighted_err)

NAME = "imf"
NOMINAL_FPE = 5
CALLS = "F (no grad, v_hat = V(x,s,s)) + J (primal is the prediction) + B through the primal"
TEACHER = None
SAMPLER = "flowmap"
GUIDANCE = "input"
DEFAULTS = {"time_dist": "logit_normal", "time_mu": -0.4, "time_sigma": 1.0, "ratio_neq": 0.5,
            "adaptive_p": 1.0, "adaptive_c": 1e-3, "adaptive_reduce": "sum", "velocity": "conditional",
            "cfg_dropout": 0.0, "cfg_omega_max": 0.0, "cfg_beta": 1.0, "cfg_interval": [0.0, 1.0],
            "aux_head": False, "aux_weight": 1.0, "generator": None}


def require_aux_head(model) -> None:
    if not getattr(model, "aux_velocity", False):
        raise ValueError(f"aux_head: needs a network with an auxiliary velocity head (MLPFlowMap(..., "
                         f"aux_velocity=True) or nn.DiT(..., aux_velocity=True)); {type(model).__name__} has none")


def guidance_inputs(model, s, t, dropped, c, g):
    """(w the model input (B,) or (B, 3), omega_e the scale in effect at s (B,)) for iMF's guidance."""
    k = require_guidance_input(model, "cfg_omega_max")
    b = s.shape[0]
    omega = sample_guidance_scale(b, c["cfg_omega_max"], c["cfg_beta"], device=s.device, dtype=s.dtype, generator=g)
    if dropped is not None:
        omega = torch.where(dropped, torch.ones_like(omega), omega)
    if k == 3:
        diag = s == t
        kw = dict(device=s.device, dtype=s.dtype, generator=g)
        lo = torch.where(diag, torch.zeros_like(s), 0.5 * torch.rand(b, **kw))
        hi = torch.where(diag, torch.ones_like(s), 0.5 + 0.5 * torch.rand(b, **kw))
        w = torch.stack([omega, lo, hi], 1)
    else:
        lo_f, hi_f = check_interval(c)
        lo, hi = torch.full_like(s, lo_f), torch.full_like(s, hi_f)
        w = omega
    inside = (s >= lo) & (s <= hi)
    return w, torch.where(inside, omega, torch.ones_like(omega))


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    if c["aux_head"]:
        return _aux_head_loss(model, x0, cond, c)
    cond_in, dropped, s, t, xs, v = eulerian_draws(model, x0, cond, c)
    w = None
    if cond is not None and c["cfg_omega_max"] > 0:
        w, omega_e = guidance_inputs(model, s, t, dropped, c, c["generator"])
        # the model input: omega where guidance applies (the interval is an input when guidance_dim = 3)
        w_in = w if w.dim() == 2 else omega_e
        with torch.no_grad():
            v_hat = call(model, xs, s, s, cond_in, w_in)  # v_c, the guided conditional velocity
            w_one = torch.ones_like(w_in)  # omega = 1 (and, guidance_dim = 3, the interval [0, 1])
            if w_in.dim() == 2:
                w_one[:, 1] = 0.0
            v_u = call(model, xs, s, s, torch.full_like(cond, null_label(model, "cfg_omega_max")), w_one)
            v = v + bcast(1 - 1 / omega_e, v) * (v_hat - v_u)
        w = w_in
    else:
        with torch.no_grad():
            v_hat = model(xs, s, s, y=cond_in)
    V, dV = jvp(model, cond_in, (xs, s, t), (v_hat, torch.ones_like(s), torch.zeros_like(t)), w=w,
                tangent_grad=False)
    W = V - bcast(t - s, x0) * dV
    werr, err = weighted_err(W, v, c["adaptive_p"], c["adaptive_c"], c["adaptive_reduce"])
    lo = werr.mean()
    return lo, detached_logs(loss=lo, mse=err.mean())


def _aux_head_loss(model, x0, cond, c):
    """The loss with iMF's auxiliary velocity head (module docstring); the same random draws as loss()."""
    require_aux_head(model)
    if not c["aux_weight"] >= 0:
        raise ValueError(f"aux_weight: expected a number >= 0, got {c['aux_weight']!r}")
    cond_in, dropped, s, t, xs, v = eulerian_draws(model, x0, cond, c)
    w = None
    if cond is not None and c["cfg_omega_max"] > 0:
        w, omega_e = guidance_inputs(model, s, t, dropped, c, c["generator"])
        w = w if w.dim() == 2 else omega_e
    V, v_aux = model(xs, s, t, y=cond_in, aux=True) if w is None else model(xs, s, t, y=cond_in, w=w, aux=True)
    v_hat = v_aux.detach()
    if w is not None:
        with torch.no_grad():  # v_u: the auxiliary head's unguided velocity (null label, omega = 1)
            w_one = torch.ones_like(w)
            if w.dim() == 2:
                w_one[:, 1] = 0.0
            null = torch.full_like(cond, null_label(model, "cfg_omega_max"))
            _, v_u = model(xs, s, t, y=null, w=w_one, aux=True)
            v = v + bcast(1 - 1 / omega_e, v) * (v_hat - v_u)
    with torch.no_grad():
        _, dV = jvp(model, cond_in, (xs, s, t), (v_hat, torch.ones_like(s), torch.zeros_like(t)), w=w)
    W = V - bcast(t - s, x0) * dV
    werr, err = weighted_err(W, v, c["adaptive_p"], c["adaptive_c"], c["adaptive_reduce"])
    aux = sq_err(v_aux, v).mean()
    lo = werr.mean() + c["aux_weight"] * aux
    return lo, detached_logs(loss=lo, mse=err.mean(), aux=aux)
