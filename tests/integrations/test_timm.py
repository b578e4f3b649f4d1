"""timm-style attention: set_timm_flowmap_attention + patch_sdpa under torch.func.jvp vs SDPA math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmap_kernels.integrations import fallback_counts, patch_sdpa, reset_fallbacks
from flowmap_kernels.integrations.timm import set_timm_flowmap_attention
from tests.integrations.helpers import errors, jvp_and_param_grads


class TimmStyleAttention(nn.Module):
    """The shape of timm.layers.Attention.forward (timm 1.0): fused_attn chooses SDPA or explicit math."""

    def __init__(self, dim=16, num_heads=2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = False  # what timm picks with TIMM_FUSED_ATTN=0 or for export
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = nn.LayerNorm(self.head_dim), nn.LayerNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def _check(model, x):
    tx = torch.randn_like(x)
    params = list(model.parameters())
    fn = lambda a: model(a)  # noqa: E731
    explicit = jvp_and_param_grads(fn, params, (x,), (tx,))  # the unfused path (works, N x N scores)
    assert set_timm_flowmap_attention(model) >= 1
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(fn, (x,), (tx,))
    ref = jvp_and_param_grads(fn, params, (x,), (tx,), math_backend=True)
    reset_fallbacks()
    with patch_sdpa():
        got = jvp_and_param_grads(fn, params, (x,), (tx,))
    assert fallback_counts() == {}
    assert max(errors(got, ref).values()) < 1e-5, errors(got, ref)
    assert max(errors(got, explicit).values()) < 1e-5


def test_timm_style_attention_module():
    torch.manual_seed(0)
    _check(nn.Sequential(TimmStyleAttention(), TimmStyleAttention()).eval(), torch.randn(2, 9, 16))


def test_real_timm_vit():
    pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3,
                              qk_norm=True).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    _check(model, torch.randn(2, 3, 8, 8))


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        set_timm_flowmap_attention(object())
