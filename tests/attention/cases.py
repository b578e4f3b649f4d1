"""Attention test cases: inputs, tangents, masks and loss weights for one configuration.

The one case type of the attention suites: the blockwise / PyTorch-backend suites (tests/attention) and
the Triton interpreter suite (tests/attention/triton) draw their inputs from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


# "bool_keys": (Lk,) only; "float_expand": (1, Hq, Lq, Lk) with a stride-0 query dim; "*_dead_rows": every
# third query row sees no key
MASKS = ("bool", "float", "bool_dead_rows", "float_dead_rows", "bool_keys", "float_expand")


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
    mask: Optional[str] = None  # None or one of MASKS
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
        if self.mask is not None and self.mask not in MASKS:
            raise ValueError(f"unknown mask kind {self.mask!r}; one of {MASKS}")
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
        if self.mask == "bool_keys":  # (Lk,) only: broadcast over batch, heads and queries (3 stride-0 dims)
            m = torch.rand(self.kv_len, generator=g) > 0.4
            m[0] = True
            t["mask"] = m
        elif self.mask == "float_expand":  # (1, Hq, Lq, Lk) with a stride-0 query dim (a user's expand())
            m = (torch.randn((1, self.q_heads, 1, self.kv_len), generator=g, dtype=torch.float64) + 0.5).to(dtype)
            m[..., ::4] = float("-inf")
            t["mask"] = m.expand(1, self.q_heads, self.q_len, self.kv_len)
        elif self.mask and self.mask.startswith("bool"):
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
