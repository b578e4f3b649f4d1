"""timm-style attention: set_timm_flowmap_attention + patch_sdpa under torch.func.jvp vs SDPA math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmap_kernels.integrations.timm import set_timm_flowmap_attention
from tests.integrations.helpers import errors, jvp_and_param_grads, patched_and_reference
from tests.reference import random_parameters_


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
    got, ref = patched_and_reference(fn, params, (x,), (tx,))
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


# timm families whose attention goes through F.scaled_dot_product_attention in different ways, shrunk to a
# few thousand parameters: RoPE (EVA-02), windows with relative position bias and shifted-window masks (Swin,
# float attn_mask), relative position bias (BEiT), keys from a spatially reduced map, Lq != Lk (PVT v2, Twins),
# mask-unit attention (Hiera), cross-covariance and class attention (XCiT), channel and window attention
# (DaViT), block and grid attention (MaxViT)
TIMM_MODELS = {
    "eva02_tiny_patch14_224": dict(img_size=28, depth=2, embed_dim=16, num_heads=2),
    "swin_tiny_patch4_window7_224": dict(img_size=56, depths=(2,), num_heads=(2,), embed_dim=16),
    "beit_base_patch16_224": dict(img_size=32, depth=2, embed_dim=16, num_heads=2),
    "pvt_v2_b0": dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 16), num_heads=(1, 2, 2, 2)),
    "twins_svt_small": dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2)),
    "hiera_tiny_224": dict(img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1)),
    "xcit_nano_12_p16_224": dict(img_size=32, depth=1, embed_dim=16, num_heads=2),
    "davit_tiny": dict(depths=(1, 1, 1, 1), embed_dims=(16, 16, 16, 16), num_heads=(2, 2, 2, 2)),
    "maxvit_nano_rw_256": dict(img_size=64),
}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_model_families_match_sdpa_math(name):
    """Real timm models (random weights, float64): under set_timm_flowmap_attention + patch_sdpa, the output,
    the tangent and the parameter gradients of a loss on the tangent equal SDPA's math backend."""
    timm = pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    torch.manual_seed(0)
    kw = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=3, **kw).double().eval()
    g = torch.Generator().manual_seed(1)
    random_parameters_(model, g, 0.2)
    size = kw.get("img_size", 64)
    x = torch.randn(1, 3, *(size if isinstance(size, tuple) else (size, size)), generator=g, dtype=torch.float64)
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert set_timm_flowmap_attention(model) >= 1
    params = list(model.parameters())
    fn = lambda a: model(a)  # noqa: E731
    got, ref = patched_and_reference(fn, params, (x,), (tx,))
    assert max(errors(got, ref).values()) < 1e-12, errors(got, ref)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        set_timm_flowmap_attention(object())
