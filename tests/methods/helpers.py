"""Tiny float64 models and slow references for the method tests (helpers of tests/methods only)."""
from __future__ import annotations

import math

import torch
from torch import nn

import flowmap_kernels as fk
from flowmap_kernels.models import MLPFlowMap
from tests.numerics import rel_err


def tiny_mlp(shape=(2,), seed=0, dtype=torch.float64, num_classes=None, **kw):
    """MLPFlowMap with a random (not zero) last layer, so V and all its derivatives are non-trivial
    (``kw``: null_class, guidance_dim, ...)."""
    torch.manual_seed(seed)
    m = MLPFlowMap(shape, hidden=16, depth=2, emb_dim=8, num_classes=num_classes, **kw).to(dtype)
    nn.init.normal_(m.out.weight, std=0.3)
    nn.init.normal_(m.out.bias, std=0.1)
    return m


class TinyAttnFlowMap(nn.Module):
    """V(x, s, t) through one fk.attention layer over `tokens` tokens (exercises its forward-mode rules)."""

    def __init__(self, dim_x=2, tokens=5, width=8, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.tokens, self.width = tokens, width
        self.inp = nn.Linear(dim_x + 2, tokens * width)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(tokens * width, dim_x)
        self.to(dtype)

    def forward(self, x, s, t, y=None):
        b = x.shape[0]
        h = torch.tanh(self.inp(torch.cat([x, s[:, None], t[:, None]], 1))).view(b, 1, self.tokens, self.width)
        o = fk.attention(self.q(h), self.k(h), self.v(h))
        return self.out(torch.tanh(o).reshape(b, -1))


def params_grad(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)


def grad_rel(ga, gb):
    """tests.numerics.rel_err of all parameter gradients as one vector (a missing gradient counts as 0)."""
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros(1)).reshape(-1) for g in gs])  # noqa: E731
    return rel_err(flat(ga), flat(gb))


def logit_normal(n, mu, sigma, g, dtype=torch.float64):
    return torch.sigmoid(mu + sigma * torch.randn(n, generator=g, dtype=dtype))


def times(n, dist, mu, sigma, g, dtype=torch.float64):
    return torch.rand(n, generator=g, dtype=dtype) if dist == "uniform" else logit_normal(n, mu, sigma, g, dtype)


def gap_pair(n, c, g, dtype=torch.float64):
    """TVM's pairs, drawn in the method's order (a normal for the gap, a uniform for the truncated
    target) and transformed with scipy's normal CDF / quantile in float64."""
    from scipy.stats import norm
    gap = torch.sigmoid(c["gap_mu"] + c["gap_sigma"] * torch.randn(n, generator=g, dtype=dtype))
    u = torch.rand(n, generator=g, dtype=dtype)
    s, t = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    for i in range(n):
        hi = math.log((1 - float(gap[i])) / float(gap[i]))
        q = float(u[i]) * norm.cdf((hi - c["time_mu"]) / c["time_sigma"])
        ti = 1 / (1 + math.exp(-(c["time_mu"] + c["time_sigma"] * norm.ppf(q))))
        t[i], s[i] = ti, min(ti + float(gap[i]), 1.0)
    return s, t


def pair(n, c, g, dtype=torch.float64):
    if c["time_dist"] == "tvm":
        return gap_pair(n, c, g, dtype)
    a = times(n, c["time_dist"], c["time_mu"], c["time_sigma"], g, dtype)
    b = times(n, c["time_dist"], c["time_mu"], c["time_sigma"], g, dtype)
    keep = torch.rand(n, generator=g, dtype=dtype) < c["ratio_neq"]
    s = torch.where(keep, torch.maximum(a, b), a)
    return s, torch.where(keep, torch.minimum(a, b), a)


def marginal_velocity(xs, s, x0, cond=None, free=None):
    """E[eps - x0 | x_s] under the empirical distribution of the rows of x0 (same label when cond), one
    row at a time from the Gaussian likelihoods N(x_s; (1 - s) x0_j, s^2 I) in float64."""
    b = x0.shape[0]
    xf, x0f = xs.reshape(b, -1).double(), x0.reshape(b, -1).double()
    out = torch.empty_like(xf)
    for i in range(b):
        si = float(s[i])
        logp = -((xf[i] - (1 - si) * x0f) ** 2).sum(1) / (2 * si ** 2)
        if cond is not None and not (free is not None and bool(free[i])):
            logp = torch.where(cond == cond[i], logp, torch.full_like(logp, -math.inf))
        w = torch.exp(logp - logp.max())
        out[i] = (w[:, None] * (xf[i] - x0f)).sum(0) / (w.sum() * si)
    return out.reshape(xs.shape)
