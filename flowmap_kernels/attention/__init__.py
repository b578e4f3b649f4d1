"""Attention with forward-mode AD and backward through the tangent."""
from . import kernels  # noqa: F401  (registers the custom ops and their FLOP formulas)
from .functional import attention, attention_jvp, resolve_backend
from .problem import AttentionProblem, make_problem
from .registry import ATTENTION
from .varlen import attention_varlen, attention_varlen_jvp, resolve_varlen_backend
from .varlen_problem import VarlenProblem, make_varlen_problem
from .varlen_registry import ATTENTION_VARLEN

__all__ = ["attention", "attention_jvp", "resolve_backend", "AttentionProblem", "make_problem", "ATTENTION",
           "attention_varlen", "attention_varlen_jvp", "resolve_varlen_backend", "VarlenProblem",
           "make_varlen_problem", "ATTENTION_VARLEN"]
