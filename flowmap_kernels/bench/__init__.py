"""Benchmarks: cost of one training iteration per flow-map method in forward-pass equivalents (FPE).

``python -m flowmap_kernels.bench fpe --help``; programmatic: :func:`run_fpe` returns a list of records.
"""
from .counting import count_flops, linear_jvp_is_fused, peak_memory
from .fpe import RECORD_FIELDS, run_fpe, variants_for
from .zoo import MODELS, build_model

__all__ = ["run_fpe", "variants_for", "RECORD_FIELDS", "count_flops", "peak_memory", "linear_jvp_is_fused",
           "MODELS", "build_model"]
