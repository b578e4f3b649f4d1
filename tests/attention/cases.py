"""Attention test cases: inputs, tangents, masks and loss weights for one configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Case:
    batch: int = 2
    q_heads: int = 2
    kv_heads: int = 2
    q_len: int = 17
    kv_len: int = 17
    head_dim: int = 24
    v_head_dim: Optional[int] = None
    causal: bool = False
    mask: Optional[str] = None  # None | "bool" | "float" | "bool_dead_rows" | "float_dead_rows"
    scale: Optional[float] = None
    seed: int = 0
    tensors: dict = field(default_factory=dict, repr=False)

    @property
    def kwargs(self) -> dict:
        return dict(attn_mask=self.tensors.get("mask"), is_causal=self.causal, scale=self.scale,
                    enable_gqa=self.q_heads != self.kv_heads)

    def id(self) -> str:
        parts = [f"B{self.batch}", f"H{self.q_heads}/{self.kv_heads}", f"L{self.q_len}x{self.kv_len}",
                 f"D{self.head_dim}" + (f"v{self.v_head_dim}" if self.v_head_dim else "")]
        if self.causal:
            parts.append("causal")
        if self.mask:
            parts.append(self.mask)
        if self.scale is not None:
            parts.append(f"s{self.scale}")
        return "-".join(parts)

    def make(self, dtype: torch.dtype, requires_grad: bool = False) -> dict:
        """Inputs in ``dtype`` (values drawn in float64, then rounded) plus float64 loss weights."""
        g = torch.Generator().manual_seed(self.seed)
        dv = self.v_head_dim or self.head_dim
        shapes = {
            "q": (self.batch, self.q_heads, self.q_len, self.head_dim),
            "k": (self.batch, self.kv_heads, self.kv_len, self.head_dim),
            "v": (self.batch, self.kv_heads, self.kv_len, dv),
        }
        t = {}
        for name in ("q", "k", "v"):
            t[name] = torch.randn(shapes[name], generator=g, dtype=torch.float64).to(dtype)
            t["t" + name] = torch.randn(shapes[name], generator=g, dtype=torch.float64).to(dtype)
        out_shape = (self.batch, self.q_heads, self.q_len, dv)
        t["wo"] = torch.randn(out_shape, generator=g, dtype=torch.float64)
        t["wt"] = torch.randn(out_shape, generator=g, dtype=torch.float64)
        mshape = (self.batch, 1, self.q_len, self.kv_len)  # broadcast over heads
        if self.mask and self.mask.startswith("bool"):
            m = torch.rand(mshape, generator=g) > 0.3
            if self.mask.endswith("dead_rows"):
                m[:, :, ::3] = False  # every third query row sees no key
            t["mask"] = m
        elif self.mask and self.mask.startswith("float"):
            m = torch.randn((1, self.q_heads, self.q_len, 1), generator=g, dtype=torch.float64) \
                + torch.randn((self.kv_len,), generator=g, dtype=torch.float64)
            m[..., :: 4] = float("-inf")
            if self.mask.endswith("dead_rows"):
                m[:, :, ::3, :] = float("-inf")
            t["mask"] = m.to(dtype)
        for name in ("q", "k", "v", "tq", "tk", "tv"):
            t[name].requires_grad_(requires_grad)
        self.tensors = t
        return t
