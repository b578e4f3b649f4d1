"""Fused JVP-plus-forward primitives of DiT blocks (forward, backward, JVP, backward through the JVP).

``modulated_layer_norm``, ``layer_norm``, ``rms_norm``, ``gelu_tanh``, ``gated_residual``, ``linear`` and
their explicit ``*_jvp`` forms returning ``(y, ty)``. Backends: "naive" (plain PyTorch), "torch" (fused
formulas in PyTorch), "extension" (compiled kernels: CPU extension / CUDA module); "auto" = extension, then
torch.
"""
from . import kernels  # noqa: F401  (registers the custom ops and FLOP formulas)
from .extension import extension_info
from .functional import (gated_residual, gated_residual_jvp, gelu_tanh, gelu_tanh_jvp, layer_norm, layer_norm_jvp,
                         linear, linear_jvp, modulated_layer_norm, modulated_layer_norm_jvp, resolve_backend,
                         rms_norm, rms_norm_jvp)
from .registry import GATED_RESIDUAL, GELU_TANH, LAYER_NORM, LINEAR, MODULATED_LAYER_NORM, REGISTRIES, RMS_NORM

__all__ = [
    "modulated_layer_norm", "modulated_layer_norm_jvp", "layer_norm", "layer_norm_jvp", "rms_norm",
    "rms_norm_jvp", "gelu_tanh", "gelu_tanh_jvp", "gated_residual", "gated_residual_jvp", "linear", "linear_jvp",
    "resolve_backend", "extension_info",
    "REGISTRIES", "MODULATED_LAYER_NORM", "LAYER_NORM", "RMS_NORM", "GELU_TANH", "GATED_RESIDUAL", "LINEAR",
]
