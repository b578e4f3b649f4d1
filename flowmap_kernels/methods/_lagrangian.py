"""The Lagrangian self-distillation loss shared by TVM and LSD (see tvm.py / lsd.py for the maths)."""
from __future__ import annotations

import torch

from ._common import (adaptive_weight, bcast, call, detached_logs, drop_labels, interpolate, jvp, null_label,
                      randn_like, require_guidance_input, rng, sample_gap_pair, sample_pair, sample_times,
                      self_or_teacher, sq_err)


def _pair(b, c, x0, g):
    if c["time_dist"] == "tvm":
        if c["ratio_neq"] != 1.0:
            raise ValueError(f"ratio_neq: time_dist 'tvm' draws only pairs with t != s (ratio_neq 1), "
                             f"got {c['ratio_neq']}")
        if "gap_mu" not in c:
            raise ValueError("time_dist: 'tvm' (gap-based pairs) is TVM's; use 'uniform' or 'logit_normal'")
        return sample_gap_pair(b, c, device=x0.device, dtype=x0.dtype, generator=g)
    return sample_pair(b, c, device=x0.device, dtype=x0.dtype, generator=g)


def _guidance_scales(model, cond, dropped, c, b, x0, g):
    """TVM's per-example guidance scale omega (B,) or None when guidance is off."""
    lo_hi = c.get("cfg_scale_range")
    if cond is None or (c.get("cfg_scale", 1.0) == 1.0 and lo_hi is None):
        return None
    require_guidance_input(model, "cfg_scale")
    if lo_hi is not None:
        lo, hi = lo_hi
        if not 0 < lo <= hi:
            raise ValueError(f"cfg_scale_range: expected [min, max] with 0 < min <= max, got {lo_hi!r}")
        omega = lo + (hi - lo) * torch.rand(b, device=x0.device, dtype=x0.dtype, **rng(g))
    else:
        if not c["cfg_scale"] > 0:
            raise ValueError(f"cfg_scale: expected a positive number, got {c['cfg_scale']!r}")
        omega = torch.full((b,), float(c["cfg_scale"]), device=x0.device, dtype=x0.dtype)
    if dropped is not None:
        omega = torch.where(dropped, torch.ones_like(omega), omega)
    return omega


def _weighted_mean(err, c):
    """The batch mean of the adaptively weighted per-sample error (adaptive_p = 0: the plain mean)."""
    return (adaptive_weight(err, c["adaptive_p"], c["adaptive_c"]) * err).mean()


def _fm_point(x0, c, g):
    """The flow-matching term's draws: r from c['fm_time_dist'], then fresh noise eps'; returns
    (r, x_r, eps' - x0)."""
    r = sample_times(x0.shape[0], c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], device=x0.device,
                     dtype=x0.dtype, generator=g)
    xr, vr = interpolate(x0, randn_like(x0, g), r)
    return r, xr, vr


def lagrangian_loss(model, x0, cond, c):
    g = c["generator"]
    b = x0.shape[0]
    cond_in, dropped = drop_labels(model, cond, c.get("cfg_dropout", 0.0), g)
    eps = randn_like(x0, g)
    s, t = _pair(b, c, x0, g)
    omega = _guidance_scales(model, cond, dropped, c, b, x0, g)
    if omega is not None:
        return _guided(model, x0, cond, cond_in, c, g, eps, s, t, omega)
    xs, _ = interpolate(x0, eps, s)
    dt = bcast(t - s, x0)
    # J (+ BJ later): V and dV/dt = d_t V(x_s, s, t), both keep their graph (backward through the JVP).
    V, dVdt = jvp(model, cond_in, (xs, s, t), (torch.zeros_like(xs), torch.zeros_like(s), torch.ones_like(t)))
    dFdt = V + dt * dVdt  # d/dt F(x_s, s, t)
    with torch.no_grad():  # stopped / EMA teacher at the terminal point sg[F(x_s, s, t)]
        x_end = xs + dt * V
        u = self_or_teacher(model, c["teacher"])(x_end, t, t, y=cond_in)
    err_lag = sq_err(dFdt, u)
    lag = _weighted_mean(err_lag, c)
    # flow-matching (diffusion) term at an independent time r: F + B.
    r, xr, vr = _fm_point(x0, c, g)
    fm = sq_err(model(xr, r, r, y=cond_in), vr).mean()
    lo = c["lag_weight"] * lag + c["fm_weight"] * fm
    return lo, detached_logs(loss=lo, lagrangian=err_lag.mean(), fm=fm)


def _guided(model, x0, cond, cond_in, c, g, eps, s, t, omega):
    """TVM's scaled classifier-free guidance (tvm.py docstring): the guidance scale omega is a model
    input, the network output is scaled by omega (scale_param), both residuals are divided by omega, and
    the flow-matching target is the guided velocity omega (eps' - x0) + (1 - omega) sg[V_T(x_r, r, r | null)]."""
    xs, _ = interpolate(x0, eps, s)
    dt = bcast(t - s, x0)
    ob = bcast(omega, x0)
    scale = ob if c["scale_param"] else torch.ones_like(ob)
    V, dVdt = jvp(model, cond_in, (xs, s, t), (torch.zeros_like(xs), torch.zeros_like(s), torch.ones_like(t)), w=omega)
    dFdt = scale * (V + dt * dVdt)
    T = self_or_teacher(model, c["teacher"])
    with torch.no_grad():
        x_end = xs + dt * scale * V
        u = scale * call(T, x_end, t, t, cond_in, omega)
    err_lag = sq_err((dFdt - u) / ob)
    lag = _weighted_mean(err_lag, c)
    r, xr, vr = _fm_point(x0, c, g)
    with torch.no_grad():
        null = torch.full_like(cond, null_label(model, "cfg_scale"))
        v_unc = call(T, xr, r, r, null, torch.ones_like(omega))
        target = ob * vr + (1 - ob) * v_unc
    fm = sq_err((scale * call(model, xr, r, r, cond_in, omega) - target) / ob).mean()
    lo = c["lag_weight"] * lag + c["fm_weight"] * fm
    return lo, detached_logs(loss=lo, lagrangian=err_lag.mean(), fm=fm, omega=omega.mean())
