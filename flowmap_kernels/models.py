"""Small flow-map networks: V(x, s, t) = the average velocity from time s to time t.

``MLPFlowMap`` flattens any per-sample shape (2D points, 8x8 digits) and runs an MLP with SiLU on
[x, emb(s), emb(t - s)]. Times enter through sinusoidal features, so the network is smooth in s and t,
which JVP-based losses (tangent along s or t) need. Project convention: see flowmap_kernels.methods.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["TimeEmbedding", "MLPFlowMap"]


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, dim): [sin(w_k t), cos(w_k t)] with w_k geometric in [1, max_freq], then a linear."""

    def __init__(self, dim: int = 64, max_freq: float = 32.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: must be even, got {dim}")
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2)), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None].to(self.freqs.dtype) * self.freqs
        return self.proj(torch.cat([torch.sin(a), torch.cos(a)], 1))


class MLPFlowMap(nn.Module):
    """model(x, s, t, y=None) -> V(x, s, t), same shape and dtype as x.

    x (B, *shape); s, t (B,) or scalars, in [0, 1]; y optional int labels (B,) when ``num_classes``.
    Architecture: h = Linear([x, emb_s(s), emb_d(t - s) (, emb_y(y))]) then ``depth`` blocks of
    SiLU -> Linear (residual), then SiLU -> Linear to the output. The last layer is zero-initialised.
    ``max_freq`` bounds the time frequencies: high ones make d/ds and d/dt of V (the JVP targets) large.
    """

    def __init__(self, shape=(2,), hidden: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: Optional[int] = None, max_freq: float = 32.0):
        super().__init__()
        self.shape = tuple(shape)
        d = int(math.prod(self.shape))
        self.emb_s = TimeEmbedding(emb_dim, max_freq)
        self.emb_d = TimeEmbedding(emb_dim, max_freq)
        self.emb_y = nn.Embedding(num_classes, emb_dim) if num_classes else None
        n_in = d + 2 * emb_dim + (emb_dim if num_classes else 0)
        self.inp = nn.Linear(n_in, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, s, t, y=None):
        b = x.shape[0]
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(b)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
        feats = [x.reshape(b, -1), self.emb_s(s), self.emb_d(t - s)]
        if self.emb_y is not None:
            if y is None:
                raise ValueError("y: this model is class-conditional (num_classes set); pass labels")
            feats.append(self.emb_y(y))
        h = self.inp(torch.cat(feats, 1))
        for lin in self.blocks:
            h = h + lin(torch.nn.functional.silu(h))
        return self.out(torch.nn.functional.silu(h)).reshape(x.shape)
