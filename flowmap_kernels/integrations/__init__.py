"""Drop-in use of flowmap_kernels inside existing models.

``patch_sdpa`` / ``install`` / ``uninstall``: route torch.nn.functional.scaled_dot_product_attention to
``fk.attention`` (see :mod:`.sdpa_patch` for what is covered). ``patch_layer_norm``: route
torch.nn.functional.layer_norm (every ``nn.LayerNorm``) to ``fk.ops.layer_norm`` under forward-mode AD, whose
tangent, unlike PyTorch 2.13's, has the right derivative (see :mod:`.layer_norm_patch`; per model:
``set_flowmap_layer_norm``). Library adapters
import their library lazily: :mod:`.diffusers` (attention processor, ``set_flowmap_attention``,
``DiffusersFlowMap``) and :mod:`.timm` (``set_timm_flowmap_attention``).
"""
from .layer_norm_patch import (
    LayerNormFallbackWarning, install_layer_norm, is_layer_norm_installed, layer_norm_fallback_counts,
    patch_layer_norm, reset_layer_norm_fallbacks, set_flowmap_layer_norm, uninstall_layer_norm,
)
from .sdpa_patch import (
    SDPAFallbackWarning, fallback_counts, install, is_installed, patch_sdpa, reset_fallbacks,
    scaled_dot_product_attention, uninstall,
)

__all__ = [
    "patch_sdpa", "install", "uninstall", "is_installed", "scaled_dot_product_attention",
    "SDPAFallbackWarning", "fallback_counts", "reset_fallbacks",
    "patch_layer_norm", "install_layer_norm", "uninstall_layer_norm", "is_layer_norm_installed",
    "LayerNormFallbackWarning", "layer_norm_fallback_counts", "reset_layer_norm_fallbacks", "set_flowmap_layer_norm",
]
