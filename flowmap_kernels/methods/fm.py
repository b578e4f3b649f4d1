"""Flow matching (the baseline): learn the instantaneous velocity V(x, t, t).

    L = E_{x0, eps, t} || V(x_t, t, t) - (eps - x0) ||^2,   x_t = (1 - t) x0 + t eps

No stop-gradient, no JVP. Time t ~ logit-normal(mu, sigma) (Esser et al. 2024; the diffusion loss of
every self-distillation method of arXiv:2505.18825) or uniform. Unweighted mean square error (mean over the
non-batch dims). Sampled with Euler steps on V(x, t, t) from t = 1 to t = 0.
Source: Lipman et al., arXiv:2210.02747 (flow matching objective).
``cfg_dropout``: label dropout for classifier-free guidance (_common.drop_labels, drawn first); sampling
applies the standard CFG combination (methods GUIDANCE "cfg").
"""
from __future__ import annotations

from ._common import detached_logs, drop_labels, interpolate, merge_cfg, randn_like, sample_times, sq_err

NAME = "fm"
NOMINAL_FPE = 3
CALLS = "F + B"
TEACHER = None
SAMPLER = "euler"
DEFAULTS = {"time_dist": "logit_normal", "time_mu": 0.0, "time_sigma": 1.0, "cfg_dropout": 0.0, "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    g = c["generator"]
    cond, _ = drop_labels(model, cond, c["cfg_dropout"], g)
    eps = randn_like(x0, g)
    t = sample_times(x0.shape[0], c["time_dist"], c["time_mu"], c["time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=g)
    xt, v = interpolate(x0, eps, t)
    err = sq_err(model(xt, t, t, y=cond), v)
    lo = err.mean()
    return lo, detached_logs(loss=lo, fm=lo)

