"""Backend registries of the DiT primitives: "naive" (plain PyTorch, the reference), "torch" (fused
formulas in PyTorch eager) and "extension" (compiled kernels: the CPU extension on CPU tensors, the CUDA
module on CUDA tensors; float16/bfloat16/float32). "auto" prefers the extension, then "torch".

linear's product is a BLAS call on every backend; its "torch" and "extension" entries are the same
stacked-[x; tx] implementation.
"""
from __future__ import annotations

from ..backends import OpRegistry
from . import extension, fused_torch, naive

AUTO_ORDER = ("extension", "torch")


def _torch_supports(device=None, dtype=None, explicit=False, numel=None, **_):
    return None


def _make(op: str) -> OpRegistry:
    reg = OpRegistry(op, auto_order=AUTO_ORDER)
    reg.register("naive", naive)
    reg.register("torch", fused_torch, supports=_torch_supports)
    reg.register("extension", extension, available=extension.available, supports=extension.supports)
    return reg


MODULATED_LAYER_NORM = _make("modulated_layer_norm")
LAYER_NORM = _make("layer_norm")
RMS_NORM = _make("rms_norm")
GELU_TANH = _make("gelu_tanh")
GATED_RESIDUAL = _make("gated_residual")

LINEAR = OpRegistry("linear", auto_order=AUTO_ORDER)
LINEAR.register("naive", naive)
LINEAR.register("torch", fused_torch)
LINEAR.register("extension", fused_torch)

REGISTRIES = {r.op: r for r in (MODULATED_LAYER_NORM, LAYER_NORM, RMS_NORM, GELU_TANH, GATED_RESIDUAL, LINEAR)}


def resolve(op: str, x, backend=None) -> str:
    """The single dispatch point of every DiT primitive: the backend name that runs ``op`` on ``x``."""
    return REGISTRIES[op].resolve(backend, device=x.device, dtype=x.dtype, numel=x.numel()).backend
