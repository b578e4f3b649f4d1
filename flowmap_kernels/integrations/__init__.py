"""Drop-in use of flowmap_kernels' attention inside existing models.

``patch_sdpa`` / ``install`` / ``uninstall``: route torch.nn.functional.scaled_dot_product_attention to
``fk.attention`` (see :mod:`.sdpa_patch` for what is covered). Library adapters import their library
lazily: :mod:`.diffusers` (attention processor, ``set_flowmap_attention``, ``DiffusersFlowMap``) and
:mod:`.timm` (``set_timm_flowmap_attention``).
"""
from .sdpa_patch import (
    SDPAFallbackWarning, fallback_counts, install, is_installed, patch_sdpa, reset_fallbacks,
    scaled_dot_product_attention, uninstall,
)

__all__ = [
    "patch_sdpa", "install", "uninstall", "is_installed", "scaled_dot_product_attention",
    "SDPAFallbackWarning", "fallback_counts", "reset_fallbacks",
]
