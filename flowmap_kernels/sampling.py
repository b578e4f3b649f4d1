"""Samplers for flow maps (project convention: noise at t = 1, data at t = 0; see methods/__init__).

    flowmap_sample(model, noise, steps)      x <- x + (t_next - t) V(x, t, t_next)   on a uniform grid 1 -> 0
    euler_sample(model, noise, steps)        x <- x + (t_next - t) V(x, t, t)        (flow matching)
    consistency_sample(model, noise, steps)  x0 <- x - t V(x, t, 0), then re-noise to the next grid time
    sample(method_module, model, noise, steps) picks by method.SAMPLER

Each takes noise (B, ...) and returns (B, ...) in the noise's dtype, evaluated in chunks under no_grad.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["flowmap_sample", "euler_sample", "consistency_sample", "sample", "SAMPLERS"]


def _grid(steps: int, like: torch.Tensor):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=like.dtype, device=like.device)


def _chunks(noise, chunk, cond):
    for i in range(0, noise.shape[0], chunk):
        yield noise[i:i + chunk], None if cond is None else cond[i:i + chunk]


@torch.no_grad()
def flowmap_sample(model, noise, steps: int, cond=None, chunk: int = 4096, generator=None):
    ts = _grid(steps, noise)
    out = []
    for x, y in _chunks(noise, chunk, cond):
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * model(x, a.expand(x.shape[0]), b.expand(x.shape[0]), y=y)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def euler_sample(model, noise, steps: int, cond=None, chunk: int = 4096, generator=None):
    ts = _grid(steps, noise)
    out = []
    for x, y in _chunks(noise, chunk, cond):
        for a, b in zip(ts[:-1], ts[1:]):
            ta = a.expand(x.shape[0])
            x = x + (b - a) * model(x, ta, ta, y=y)
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def consistency_sample(model, noise, steps: int, cond=None, chunk: int = 4096,
                       generator: Optional[torch.Generator] = None):
    ts = _grid(steps, noise)
    out = []
    for x, y in _chunks(noise, chunk, cond):
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i, a in enumerate(ts[:-1]):
            x0 = x - a * model(x, a.expand(x.shape[0]), zero, y=y)
            nxt = ts[i + 1]
            if nxt > 0:
                e = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                x = (1 - nxt) * x0 + nxt * e
            else:
                x = x0
        out.append(x)
    return torch.cat(out)


SAMPLERS = {"flowmap": flowmap_sample, "euler": euler_sample, "consistency": consistency_sample}


def sample(method, model, noise, steps: int, cond=None, generator=None):
    """Sample with the method module's SAMPLER ("flowmap", "euler" or "consistency")."""
    return SAMPLERS[method.SAMPLER](model, noise, steps, cond=cond, generator=generator)
