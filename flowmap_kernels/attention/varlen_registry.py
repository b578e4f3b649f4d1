"""The packed (variable-length) attention op's backend registry.

``naive``  :mod:`.varlen_naive` (per-sequence naive math; ``attention`` / ``attention_jvp``).
``torch``  :mod:`.varlen_blockwise` (per-sequence blockwise kernels; the four ``varlen_*`` functions).
``triton`` the ``varlen_*`` launchers of the Triton kernels' module, with the blockwise signatures; it is
           available only when a module under ``flowmap_kernels.attention.triton`` defines all four.
Selected by the same ``fk.use_backend`` / ``fk.set_backend`` names as every other op.
"""
from __future__ import annotations

import importlib

from ..backends import OpRegistry
from . import varlen_blockwise, varlen_naive
from .registry import triton_supports

ATTENTION_VARLEN = OpRegistry("attention_varlen", auto_order=("triton", "torch"))
ATTENTION_VARLEN.register("naive", varlen_naive)
ATTENTION_VARLEN.register("torch", varlen_blockwise)

#: The four launchers a backend of the custom ops provides (signatures in :mod:`.varlen_blockwise`).
LAUNCHERS = ("varlen_forward", "varlen_jvp_forward", "varlen_backward", "varlen_jvp_backward")
#: Modules searched, in order, for the Triton launchers.
TRITON_MODULES = ("flowmap_kernels.attention.triton.varlen", "flowmap_kernels.attention.triton.launch")


def triton_launcher_module():
    """The first module of :data:`TRITON_MODULES` that defines all of :data:`LAUNCHERS`, else None."""
    for name in TRITON_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if all(hasattr(mod, f) for f in LAUNCHERS):
            return mod
    return None


def _register_triton() -> None:
    """Triton backend: CUDA tensors, float16/bfloat16 with head dims up to 256, float32 up to 64 (see
    :func:`registry.triton_supports`)."""
    def available() -> bool:  # cached once
        importlib.import_module("triton")
        return triton_launcher_module() is not None

    class _Lazy:
        """Resolves the Triton launchers on first use."""
        def __getattr__(self, name):
            mod = triton_launcher_module()
            if mod is None:
                raise AttributeError(f"no module of {TRITON_MODULES} defines the launchers {LAUNCHERS}")
            return getattr(mod, name)

    ATTENTION_VARLEN.register("triton", _Lazy(), available=available, supports=triton_supports)


_register_triton()
