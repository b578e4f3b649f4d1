"""What this install has: versions, usable backends per op, compiled extensions and their archs."""
from __future__ import annotations

import importlib

import torch


def module_version(module: str):
    """``module.__version__``, or None when the module is missing or fails to import."""
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def build_info() -> dict:
    """A dict: torch/triton versions, usable backends per op, compiled extensions (cpu_extension,
    cuda_extension_built, cuda_archs) and where float64 attention runs."""
    from .attention.registry import ATTENTION
    from .attention.varlen_registry import ATTENTION_VARLEN
    from .ops import REGISTRIES, extension_info

    backends = {"attention": ATTENTION.usable(), "attention_varlen": ATTENTION_VARLEN.usable()}
    backends.update({name: reg.usable() for name, reg in REGISTRIES.items()})
    return {
        "version": importlib.import_module("flowmap_kernels").__version__,
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "backends": backends,
        "attention_float64": "torch",  # float64 never runs in Triton: the blockwise PyTorch path
        **extension_info(),
    }
