"""The Lagrangian self-distillation loss shared by TVM and LSD (see tvm.py / lsd.py for the maths)."""
from __future__ import annotations

import torch

from ._common import (adaptive_weight, bcast, detached_logs, interpolate, jvp, randn_like, sample_pair,
                      sample_times, self_or_teacher, sq_err)


def lagrangian_loss(model, x0, cond, c):
    g = c["generator"]
    b = x0.shape[0]
    eps = randn_like(x0, g)
    s, t = sample_pair(b, c, device=x0.device, dtype=x0.dtype, generator=g)
    xs, _ = interpolate(x0, eps, s)
    dt = bcast(t - s, x0)
    # J (+ BJ later): V and dV/dt = d_t V(x_s, s, t), both keep their graph (backward through the JVP).
    V, dVdt = jvp(model, cond, (xs, s, t), (torch.zeros_like(xs), torch.zeros_like(s), torch.ones_like(t)))
    dFdt = V + dt * dVdt  # d/dt F(x_s, s, t)
    with torch.no_grad():  # stopped / EMA teacher at the terminal point sg[F(x_s, s, t)]
        x_end = xs + dt * V
        u = self_or_teacher(model, c["teacher"])(x_end, t, t, y=cond)
    err_lag = sq_err(dFdt, u)
    w = adaptive_weight(err_lag, c["adaptive_p"], c["adaptive_c"])
    lag = (w * err_lag).mean()
    # flow-matching (diffusion) term at an independent time r: F + B.
    r = sample_times(b, c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=g)
    eps2 = randn_like(x0, g)
    xr, vr = interpolate(x0, eps2, r)
    fm = sq_err(model(xr, r, r, y=cond), vr).mean()
    lo = c["lag_weight"] * lag + c["fm_weight"] * fm
    return lo, detached_logs(loss=lo, lagrangian=err_lag.mean(), fm=fm)
