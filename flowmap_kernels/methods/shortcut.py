"""Shortcut models (Frans et al. 2024): compositional self-consistency plus flow matching.

Shortcut models put noise at t = 0 and step forward by d; converted to the project convention (noise
at 1, steps go down in time), with step 2h from source s to target s - 2h:

    x_mid = x_s - h V_sg(x_s, s, s - h)
    V_hat = ( V_sg(x_s, s, s - h) + V_sg(x_mid, s - h, s - 2h) ) / 2
    L = E_sc || V(x_s, s, s - 2h) - sg[V_hat] ||^2 + E_fm || V(x_r, r, r) - (eps - x0) ||^2

(Frans et al., arXiv:2410.12557; Boffi et al., arXiv:2505.18825, compositional rule). V_sg: the EMA
weights (TEACHER = "ema": the paper's released code builds the self-consistency targets with the EMA
parameters) passed by the trainer as cfg teacher=, else the current weights under torch.no_grad (the
2D preset: teacher "self"). No JVP. Step sizes 2h = 2^-k,
k uniform in {0, ..., log2(M) - 1} (M = 128 base steps, smallest 2h = 2/M); the source s is uniform on
the grid {2h, 4h, ..., 1}; for the smallest step the two halves use the instantaneous velocity (h -> 0
as in the paper's d = 0 targets). A fraction sc_fraction of the batch gets the consistency term (1/8,
the released code's bootstrap_every = 8; the 2D preset keeps 1/4), the rest flow matching with r ~
uniform. Both terms in one forward over the concatenated batch (the shared body with psd: methods/_compositional.py).
Cost on the full batch: 2 stopped F + F + B + flow-matching F + B = 8 FPE.
``cfg_dropout``: label dropout for classifier-free guidance (_common.drop_labels, drawn first); sampling
applies the standard CFG combination (methods GUIDANCE "cfg").
"""
from __future__ import annotations

import math

import torch

from ._common import merge_cfg, rng
from ._compositional import compositional_loss

NAME = "shortcut"
NOMINAL_FPE = 8
CALLS = "2 stopped F (two half steps) + F + B (consistency part) + flow-matching F + B"
TEACHER = "ema"
SAMPLER = "flowmap"
DEFAULTS = {"base_steps": 128, "sc_fraction": 0.125, "sc_weight": 1.0, "cfg_dropout": 0.0, "teacher": None,
            "generator": None}


def loss(model, x0, *, cond=None, **cfg):
    c = merge_cfg(DEFAULTS, cfg, NAME, x0)
    M = int(c["base_steps"])
    if M < 2 or M & (M - 1):
        raise ValueError(f"base_steps: expected a power of two >= 2, got {M}")
    levels = int(math.log2(M))

    def sample_hops(n, g, **kw):
        # 2h = 2^-k, s on the grid of multiples of 2h; the smallest step uses instantaneous velocities
        k = torch.randint(0, levels, (n,), **rng(g), device=kw["device"])
        two_h = torch.pow(2.0, -k.to(kw["dtype"]))
        j = torch.floor(torch.rand(n, **rng(g), **kw) * torch.round(1.0 / two_h)) + 1  # 1..cells
        s = (j * two_h).clamp(max=1.0)
        u, t = s - two_h / 2, s - two_h
        smallest = k == levels - 1
        return s, u, t, torch.where(smallest, s, u), torch.where(smallest, u, t), torch.full_like(s, 0.5)

    return compositional_loss(model, x0, cond, c, sample_hops)
