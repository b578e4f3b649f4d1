"""flowmap_kernels: forward-mode-AD kernels for training flow maps.

Attention that works under torch.func.jvp with a differentiable tangent (``attention``,
``attention_jvp``; packed variable-length sequences: ``attention_varlen``, ``attention_varlen_jvp``),
fused JVP primitives for DiT blocks, flow-map losses and training loops.
"""
from .attention import attention, attention_jvp, attention_varlen, attention_varlen_jvp
from .activation_checkpoint import apply_activation_checkpointing, checkpoint
from .backends import BACKEND_NAMES, get_backend, set_backend, use_backend
from .integrations import install as install_sdpa_patch
from .integrations import patch_layer_norm, patch_sdpa
from .integrations import uninstall as uninstall_sdpa_patch
from .ops import kernels as _ops_kernels  # noqa: F401  (registers the DiT primitives' custom ops, as torch.export.load needs)

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_jvp", "attention_varlen", "attention_varlen_jvp",
    "use_backend", "set_backend", "get_backend", "build_info", "BACKEND_NAMES",
    "patch_sdpa", "install_sdpa_patch", "uninstall_sdpa_patch", "patch_layer_norm",
    "checkpoint", "apply_activation_checkpointing",
    "__version__",
]


def __getattr__(name):
    """Submodules on first use: fk.ops, fk.nn, fk.methods, fk.bench; build_info from .info (not imported with
    the package, so that ``python -m flowmap_kernels.info`` runs that module fresh)."""
    if name == "build_info":
        from .info import build_info
        return build_info
    if name in ("ops", "nn", "methods", "bench"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'flowmap_kernels' has no attribute {name!r}")
