"""Samplers for flow maps (project convention: noise at t = 1, data at t = 0; see methods/__init__).

    flowmap_sample(model, noise, steps)      x <- x + (t_next - t) V(x, t, t_next)   on a uniform grid 1 -> 0
    euler_sample(model, noise, steps)        x <- x + (t_next - t) V(x, t, t)        (flow matching)
    consistency_sample(model, noise, steps)  x0 <- x - t V(x, t, 0), then re-noise to the next grid time
    sample(method_module, model, noise, steps) picks by method.SAMPLER

Each takes noise (B, ...) and returns (B, ...) in the noise's dtype, evaluated in chunks under no_grad.

Classifier-free guidance: ``guidance_scale`` omega (with labels ``cond``; None or 1: off) and
``guidance`` the way it applies (sample() takes it from the method's GUIDANCE, default "cfg"):

    "cfg"           V = V(x, s, t | null) + omega (V(x, s, t | c) - V(x, s, t | null))   (two forwards; the
                    standard combination, Ho & Salimans arXiv:2207.12598, applied to the average velocity)
    "input"         V = V(x, s, t | c, w=omega)              (iMF, arXiv:2512.02012: the scale is a model input)
    "scaled_input"  V = omega V(x, s, t | c, w=omega)        (TVM's scaled parameterisation, arXiv:2511.19797)

``guidance_interval`` (lo, hi): guidance only on steps whose source time lies in [lo, hi] (outside:
omega = 1); for "input" models with a 3-dimensional guidance input the interval is passed to the model
as well (w = [omega, lo, hi]).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["flowmap_sample", "euler_sample", "consistency_sample", "sample", "SAMPLERS", "GUIDANCE_MODES",
           "guided"]

GUIDANCE_MODES = ("cfg", "input", "scaled_input")


def _grid(steps: int, like: torch.Tensor):
    """The time grid 1 -> 0 in at least float32 (``_work_dtype``): a 16-bit grid would round the times
    (bfloat16 keeps 8 bits: 1000 steps collapse to about 500 distinct times, some steps of size 0). The
    model still sees its inputs in the noise's dtype (``_at``), as in training."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=_work_dtype(like.dtype), device=like.device)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The samplers' state and time grid: float32 for 16-bit noise (a bfloat16 state loses every update
    below its 8-bit resolution: 1000 Euler steps of size 1e-3 leave x unchanged), else the noise's dtype."""
    return torch.promote_types(dtype, torch.float32)


def _at(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The grid time ``a`` (0-d) as the model's (B,) time input, in x's dtype."""
    return a.to(x.dtype).expand(x.shape[0])


def guided(model, guidance_scale=None, guidance: str = "cfg", interval=(0.0, 1.0)):
    """model(x, s, t, y=...) with classifier-free guidance applied (module docstring), as a function of
    the same signature; ``model`` itself when guidance_scale is None or 1 (bit-identical sampling)."""
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"guidance: expected one of {list(GUIDANCE_MODES)}, got {guidance!r}")
    if guidance_scale is None or (guidance_scale == 1.0 and guidance == "cfg"):
        return model
    omega = float(guidance_scale)
    if not math.isfinite(omega) or not (omega >= 0 if guidance == "cfg" else omega > 0):
        raise ValueError(f"guidance_scale: expected a number {'>= 0' if guidance == 'cfg' else '> 0'} "
                         f"(finite; 0 with 'cfg': unconditional), got {guidance_scale!r}")
    if len(interval) != 2:
        raise ValueError(f"guidance_interval: expected (lo, hi) with 0 <= lo <= hi <= 1, got {interval!r}")
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval: expected (lo, hi) with 0 <= lo <= hi <= 1, got {interval!r}")
    k = int(getattr(model, "guidance_dim", 0) or 0)
    if guidance != "cfg" and k < 1:
        raise ValueError(f"guidance: {guidance!r} needs a model with a guidance input (guidance_dim >= 1)")
    null = None
    if guidance == "cfg":
        from .methods._common import null_label
        null = null_label(model, "guidance_scale")

    def fn(x, s, t, y=None):
        if y is None:
            raise ValueError("cond: guided sampling needs labels (cond=...)")
        inside = (s >= lo) & (s <= hi)
        om = torch.where(inside, torch.full_like(s, omega), torch.ones_like(s))
        ob = om.reshape(-1, *([1] * (x.dim() - 1)))
        if guidance == "cfg":
            vc = model(x, s, t, y=y)
            vu = model(x, s, t, y=torch.full_like(y, null))
            return vu + ob * (vc - vu)
        w = om if k == 1 else torch.stack([torch.full_like(s, v) for v in (omega, lo, hi)], 1)
        out = model(x, s, t, y=y, w=w)
        return ob * out if guidance == "scaled_input" else out
    return fn


def _chunks(noise, chunk, cond):
    for i in range(0, noise.shape[0], chunk):
        yield noise[i:i + chunk], None if cond is None else cond[i:i + chunk]


def _step_sample(model, noise, steps, cond, chunk, target_is_source: bool):
    """x <- x + (b - a) model(x, a, b) over the grid 1 -> 0 (target_is_source: model(x, a, a))."""
    ts = _grid(steps, noise)
    out = []
    for xn, y in _chunks(noise, chunk, cond):
        x = xn.to(ts.dtype)
        for a, b in zip(ts[:-1], ts[1:]):
            ta = _at(a, xn)
            x = x + (b - a) * model(x.to(xn.dtype), ta, ta if target_is_source else _at(b, xn), y=y).to(x.dtype)
        out.append(x.to(noise.dtype))
    return torch.cat(out) if out else noise.clone()


@torch.no_grad()
def flowmap_sample(model, noise, steps: int, cond=None, chunk: int = 4096, generator=None,
                  guidance_scale=None, guidance: str = "cfg", guidance_interval=(0.0, 1.0)):
    model = guided(model, guidance_scale, guidance, guidance_interval)
    return _step_sample(model, noise, steps, cond, chunk, target_is_source=False)


@torch.no_grad()
def euler_sample(model, noise, steps: int, cond=None, chunk: int = 4096, generator=None,
                  guidance_scale=None, guidance: str = "cfg", guidance_interval=(0.0, 1.0)):
    model = guided(model, guidance_scale, guidance, guidance_interval)
    return _step_sample(model, noise, steps, cond, chunk, target_is_source=True)


@torch.no_grad()
def consistency_sample(model, noise, steps: int, cond=None, chunk: int = 4096,
                       generator: Optional[torch.Generator] = None, guidance_scale=None, guidance: str = "cfg",
                       guidance_interval=(0.0, 1.0)):
    model = guided(model, guidance_scale, guidance, guidance_interval)
    ts = _grid(steps, noise)
    out = []
    for x, y in _chunks(noise, chunk, cond):
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i, a in enumerate(ts[:-1]):
            x0 = x - a * model(x, _at(a, x), zero, y=y)
            nxt = ts[i + 1]
            if nxt > 0:
                e = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                x = (1 - nxt) * x0 + nxt * e
            else:
                x = x0
        out.append(x)
    return torch.cat(out) if out else noise.clone()


SAMPLERS = {"flowmap": flowmap_sample, "euler": euler_sample, "consistency": consistency_sample}


def sample(method, model, noise, steps: int, cond=None, generator=None, guidance_scale=None,
           guidance_interval=(0.0, 1.0)):
    """Sample with the method module's SAMPLER ("flowmap", "euler" or "consistency"); with
    ``guidance_scale`` the method's GUIDANCE mode ("cfg" when it declares none)."""
    return SAMPLERS[method.SAMPLER](model, noise, steps, cond=cond, generator=generator,
                                    guidance_scale=guidance_scale, guidance=getattr(method, "GUIDANCE", "cfg"),
                                    guidance_interval=guidance_interval)
