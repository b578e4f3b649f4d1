"""The attention op's backend registry: which implementations exist and what "auto" prefers."""
from __future__ import annotations

import importlib
from typing import Optional

from .._autodiff import triton_interpreter
from ..backends import OpRegistry
from . import blockwise, naive

ATTENTION = OpRegistry("attention", auto_order=("triton", "torch"))
ATTENTION.register("naive", naive)
ATTENTION.register("torch", blockwise)


def cuda_arch_family(device) -> Optional[str]:
    """Arch family ("sm90", ...) of a CUDA device; None where no GPU can say (a CUDA device named on a
    CPU-only host: the float32 routing then takes the rule of the families that do not pad head dims)."""
    import torch
    from .triton.configs import current_arch
    return current_arch(device) if torch.cuda.is_available() else None


def triton_supports(device, dtype, head_dim, v_head_dim, explicit=False, **_):
    """None when the Triton kernels take this problem, else why not (shared by attention and attention_varlen):
    CUDA tensors (CPU ones only in the interpreter, backend named), float16/bfloat16 with head dims up to
    256, float32 up to 32 and 48/64 (every head dim up to 64 on sm90 / sm100, up to 32 on sm120; anything in
    the interpreter)."""
    import torch
    interpreted = explicit and device.type == "cpu" and triton_interpreter()
    if device.type != "cuda" and not interpreted:
        return (f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 and the backend named "
                f"explicitly), got {device.type}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} runs on the 'torch' backend"
    if max(head_dim, v_head_dim) > 256:
        return f"head dim {max(head_dim, v_head_dim)} > 256"
    if dtype == torch.float32 and not interpreted:
        from .triton.configs import fp32_head_dim_supported
        arch = cuda_arch_family(device)
        if not fp32_head_dim_supported(head_dim, v_head_dim, arch):
            return (f"float32 with head dims ({head_dim}, {v_head_dim}) runs on the 'torch' backend on {arch} "
                    f"(Triton float32 covers head dims <= 32 and 48 or 64, on sm90 / sm100 every head dim "
                    f"<= 64, on sm120 <= 32: 3xTF32 products spill registers beyond; see docs/triton.md)")
    return None


def _register_triton() -> None:
    """Triton backend: CUDA tensors, float16/bfloat16 with head dims up to 256, float32 up to 64 (see
    :func:`triton_supports`)."""
    def available() -> bool:  # cached once: must not depend on the environment of the moment
        importlib.import_module("triton")
        return True

    class _Lazy:
        """Imports the Triton launchers on first use."""
        def __getattr__(self, name):
            return getattr(importlib.import_module("flowmap_kernels.attention.triton.launch"), name)

    ATTENTION.register("triton", _Lazy(), available=available, supports=triton_supports)


_register_triton()
