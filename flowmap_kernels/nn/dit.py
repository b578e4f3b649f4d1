"""A small DiT for images predicting the flow map's average velocity V(x_s, s, t).

Convention (project-wide): t=0 data, t=1 noise, F(x_s, s, t) = x_s + (t - s) V(x_s, s, t).
``model(x, s, t, y=None)``: x (B, C, H, W), s and t (B,) floats, y (B,) long class labels or None (the null
class, for classifier-free guidance) -> V (B, out_channels, H, W). Patchify by a linear map of p x p patches,
fixed 2-D sin-cos position embeddings, conditioning c = emb_s(s) + emb_t(t) + emb_y(y), adaLN-Zero blocks,
final adaLN layer, unpatchify.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .layers import DiTBlock, FinalLayer, LabelEmbedder, Linear, TimestepEmbedder


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim)."""
    if dim % 4:
        raise ValueError(f"hidden_size: must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one(dim // 2, gh), one(dim // 2, gw)], axis=1)
    return torch.from_numpy(emb).float()


class DiT(nn.Module):
    """DiT with two time inputs (s, t). See the module docstring for the signature."""

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 1, hidden_size: int = 64,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10,
                 out_channels: Optional[int] = None, qk_norm: bool = False, freq_dim: int = 64):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"patch_size: {patch_size} does not divide input_size {input_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        self.x_embedder = Linear(in_channels * patch_size * patch_size, hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size, freq_dim)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)

    def patchify(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        B = x.shape[0]
        p, g, C = self.patch_size, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, x, s, t, y: Optional[torch.Tensor] = None):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.input_size or x.shape[3] != self.input_size:
            raise ValueError(f"x: expected (B, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        B = x.shape[0]
        for name, v in (("s", s), ("t", t)):
            if not isinstance(v, torch.Tensor) or v.shape != (B,):
                raise ValueError(f"{name}: expected a float tensor of shape ({B},), got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        h = self.x_embedder(self.patchify(x)) + self.pos_embed.to(x.dtype)
        c = self.s_embedder(s) + self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, B, x.device)
        elif y is not None:
            raise ValueError("y: this DiT has num_classes=0 (unconditional)")
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))


def dit_tiny(**kw) -> DiT:
    """8x8 single-channel digits: patch 2 (16 tokens), hidden 64, depth 2, 4 heads, 10 classes."""
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    return DiT(**cfg)
