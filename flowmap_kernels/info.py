"""What this install has: versions, usable backends, compiled extensions."""
from __future__ import annotations

import importlib

import torch


def _version(module: str):
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def build_info() -> dict:
    """A dict: torch/triton versions, usable backends per op, compiled extensions and their archs."""
    from .attention.registry import ATTENTION

    info = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "backends": {"attention": ATTENTION.usable()},
        "attention_float64": "torch",  # float64 never runs in Triton: the blockwise PyTorch path
    }
    return info
