"""timm integration: make timm's attention modules call scaled_dot_product_attention, then route it.

timm's ``Attention`` (and ``AttentionRope``, the ViT/EVA/... attention blocks) chooses per module between
``F.scaled_dot_product_attention`` (``fused_attn=True``) and an explicit softmax(q k^T) v. The explicit
path already works under torch.func.jvp but holds N x N scores; the fused path raises NotImplementedError
under forward-mode AD on CPU. :func:`set_timm_flowmap_attention` switches every such module to the fused
path; inside :func:`flowmap_kernels.integrations.patch_sdpa` those calls then run fk.attention::

    set_timm_flowmap_attention(vit)
    with patch_sdpa():
        out, tangent = torch.func.jvp(vit, (x,), (tx,))

For a loss on the tangent (TVM, LSD) add ``patch_layer_norm()`` (or ``set_flowmap_layer_norm(vit)``):
the derivative of ``nn.LayerNorm``'s tangent is wrong in PyTorch 2.13 (see
:mod:`flowmap_kernels.integrations.layer_norm_patch`)::

    with patch_sdpa(), patch_layer_norm():
        out, tangent = torch.func.jvp(vit, (x,), (tx,))
        tangent.square().mean().backward()

timm is not imported here (nothing in this module needs it). Attention dropout in train mode
(``attn_drop > 0``) falls back to the original SDPA with a warning.
"""
from __future__ import annotations

from torch import nn

__all__ = ["set_timm_flowmap_attention"]


def set_timm_flowmap_attention(model: nn.Module) -> int:
    """Set ``fused_attn = True`` on every submodule that has a boolean ``fused_attn`` attribute (timm's
    attention modules); returns how many. Their SDPA calls go to fk.attention inside ``patch_sdpa()``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = True
            n += 1
    return n
