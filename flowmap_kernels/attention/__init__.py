"""Attention with forward-mode AD and backward through the tangent."""
from . import kernels  # noqa: F401  (registers the custom ops and their FLOP formulas)
from .functional import attention, attention_jvp, resolve_backend
from .problem import AttentionProblem, make_problem
from .registry import ATTENTION

__all__ = ["attention", "attention_jvp", "resolve_backend", "AttentionProblem", "make_problem", "ATTENTION"]
