"""Argument checking for the DiT primitives: one function per op turns its arguments into a problem
descriptor (a frozen dataclass, as ``attention/problem.py``'s AttentionProblem), which the autograd.Functions
and kernels take.

Every op works on rows: ``x`` of shape (..., C) is viewed as (R, C) with R = prod(...). A per-channel
operand (shift, scale, gate, weight, bias) broadcastable to ``x`` is described by an :class:`OperandLayout`:
when its leading dims are a prefix of ``x``'s followed by ones (``(C,)``, ``(B, 1, C)``, ``(B, N, C)``),
it is a contiguous (M, C) table and row r uses table row ``r // (R // M)`` (no copy); any other
broadcast (``(1, N, C)``, a trailing 1) is expanded to (R, C) and its gradient summed back.

Descriptors: :class:`NormProblem` (modulated LayerNorm, RMSNorm), :class:`ElementwiseProblem` (GELU with its
bias, gated residual with its gate). Bad input raises ``ValueError`` / ``TypeError`` naming the argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .._autodiff import SIXTEEN_BIT_DTYPES, tangent_dtype_allowed

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ref: Optional[torch.Tensor] = None, min_dim: int = 1) -> torch.Tensor:
    """``x`` is a floating tensor with at least ``min_dim`` dims, and ``ref``'s dtype and device if given."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dim(s), got shape {tuple(x.shape)}")
    if ref is not None:
        if x.dtype != ref.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} does not match x dtype {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name}: device {x.device} does not match x device {ref.device}")
    return x


def check_tangent(name: str, t, primal: torch.Tensor) -> Optional[torch.Tensor]:
    """A tangent is None (zero) or a tensor with its primal's shape and device, and its primal's dtype or,
    for a float16/bfloat16 primal, float32 (a float32 tangent: the ops' ``*_jvp`` then run in float32)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != primal.shape or not tangent_dtype_allowed(t.dtype, primal.dtype) or t.device != primal.device:
        wide = " (or float32)" if primal.dtype in SIXTEEN_BIT_DTYPES else ""
        raise ValueError(f"{name}: expected shape {tuple(primal.shape)}, {primal.dtype}{wide} on {primal.device}; "
                         f"got {tuple(t.shape)}, {t.dtype} on {t.device}")
    return t


def check_broadcast(name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    try:
        full = torch.broadcast_shapes(m.shape, x.shape)
    except RuntimeError:
        full = None
    if full != x.shape:
        raise ValueError(f"{name}: shape {tuple(m.shape)} is not broadcastable to x's shape {tuple(x.shape)}")


def check_channels(x: torch.Tensor) -> None:
    """The normalized (last) dim of ``x`` is not empty."""
    if x.dim() >= 1 and x.shape[-1] == 0:
        raise ValueError(f"x: the normalized (last) dim has size 0 (shape {tuple(x.shape)}); expected at least "
                         f"one channel")


def check_eps(eps) -> float:
    if isinstance(eps, torch.Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a non-negative float, got {eps!r}")
    return float(eps)


def check_channel_vector(name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    """A (C,) operand (RMSNorm weight, GELU bias): x's dtype and device, shape (C,)."""
    check_tensor(name, m, ref=x)
    if tuple(m.shape) != (x.shape[-1],):
        raise ValueError(f"{name}: expected shape ({x.shape[-1]},) (the last dim of x), got {tuple(m.shape)}")


@dataclass(frozen=True)
class OperandLayout:
    """How a broadcast operand of shape ``shape`` maps onto the (R, C) rows of ``x``.

    ``rows`` = M table rows; ``grouped`` True: the operand is a (M, C) view with row r -> r // (R // M);
    False: it is expanded to (R, C) (M = R) and gradients are summed back to ``shape``.
    """

    shape: tuple
    x_shape: tuple
    rows: int
    grouped: bool

    @staticmethod
    def of(m: torch.Tensor, x: torch.Tensor) -> "OperandLayout":
        xs, ms = tuple(x.shape), tuple(m.shape)
        C = xs[-1]
        R = x.numel() // C if C else 0
        padded = (1,) * (len(xs) - len(ms)) + ms
        lead, xlead = padded[:-1], xs[:-1]
        k = 0
        while k < len(lead) and lead[k] == xlead[k]:
            k += 1
        grouped = padded[-1] == C and all(d == 1 for d in lead[k:])
        if grouped:
            M = 1
            for d in lead[:k]:
                M *= d
            return OperandLayout(ms, xs, M, True)
        return OperandLayout(ms, xs, R, False)

    def table(self, m: torch.Tensor) -> torch.Tensor:
        """The operand as a contiguous (M, C) table."""
        C = self.x_shape[-1]
        if self.grouped:
            return m.reshape(self.rows, C).contiguous()
        return m.expand(self.x_shape).reshape(self.rows, C).contiguous()

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """A gradient table (M, C) back to the operand's shape (summing an expanded broadcast)."""
        if self.grouped:
            return g.reshape(self.shape)
        return g.reshape(self.x_shape).sum_to_size(self.shape)


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) as a (R, C) tensor with unit stride along C (a view when possible)."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if C > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def chunk_rows(rows_per_group: list, target: int) -> int:
    """The largest divisor of every group size that is <= target (rows reduced together per chunk)."""
    g = 0
    for n in rows_per_group:
        g = math.gcd(g, int(n))
    g = max(g, 1)
    best = 1
    for d in range(1, min(g, max(target, 1)) + 1):
        if g % d == 0:
            best = d
    return best


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def rows_per_chunk(registry, backend: str, x: torch.Tensor, layouts) -> int:
    """Rows reduced together per chunk of a table gradient: a divisor of every operand's group size, near the
    chunk target of ``backend``'s implementation in ``registry``."""
    R = _rows(x)
    groups = [R // s.rows for s in layouts if s is not None and s.rows]
    if not groups:
        return 1
    n_groups = min(s.rows for s in layouts if s is not None and s.rows)
    if torch.compiler.is_exporting():  # (whole groups: no guard on the sizes' divisors, which a Dim refuses)
        return min(groups)
    target = registry.impls[backend].impl.chunk_target(R, x.device, n_groups)
    if torch.compiler.is_compiling():
        return traceable_chunk_rows(groups, target)
    return chunk_rows(groups, target)


def traceable_chunk_rows(rows_per_group: list, target) -> int:
    """:func:`chunk_rows` for torch.compile, where the sizes may be symbolic (dynamic shapes, which Dynamo turns on
    by itself when a second shape arrives): math.gcd and a divisor search over a SymInt cannot be traced. The group
    sizes nest (each is a product of trailing leading dims of x, or 1 for an expanded operand), so the smallest is
    their gcd; it is halved while even and above the target. Equal to chunk_rows when that is a power-of-two
    fraction of the group (always when the group fits the target); otherwise a larger divisor (fewer chunks)."""
    rpc = min(rows_per_group)
    target = max(target, 1)
    while rpc > target and rpc % 2 == 0:
        rpc = rpc // 2
    return max(rpc, 1)


# ---- problem descriptors ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NormProblem:
    """One row-norm call: y = xh * (offset + scale) + shift, xh = LayerNorm (``center``) or RMSNorm of x."""
    center: bool
    offset: float
    eps: float
    scale_layout: Optional[OperandLayout]
    shift_layout: Optional[OperandLayout]
    x_shape: tuple
    rows: int
    rpc: int
    backend: str


@dataclass(frozen=True, eq=False)
class ElementwiseProblem:
    """One elementwise call: ``layout`` describes the bias (GELU) or the gate (gated residual)."""
    layout: Optional[OperandLayout]
    x_shape: tuple
    rows: int
    rpc: int
    backend: str


def make_modulated_layer_norm_problem(x, shift, scale, eps, registry, backend: str) -> NormProblem:
    check_tensor("x", x)
    check_channels(x)
    check_tensor("shift", shift, ref=x, min_dim=0)
    check_tensor("scale", scale, ref=x, min_dim=0)
    check_broadcast("shift", shift, x)
    check_broadcast("scale", scale, x)
    ss, hs = OperandLayout.of(scale, x), OperandLayout.of(shift, x)
    return NormProblem(True, 1.0, check_eps(eps), ss, hs, tuple(x.shape), _rows(x),
                       rows_per_chunk(registry, backend, x, (ss, hs)), backend)


def _affine_norm_problem(center: bool, x, weight, bias, eps, registry, backend: str) -> NormProblem:
    """y = xh * weight + bias (each optional, (C,)), xh = LayerNorm (``center``) or RMSNorm of x."""
    check_tensor("x", x)
    check_channels(x)
    layouts = []
    for name, m in (("weight", weight), ("bias", bias)):
        if m is not None:
            check_channel_vector(name, m, x)
        layouts.append(None if m is None else OperandLayout.of(m, x))
    ws, bs = layouts
    return NormProblem(center, 0.0 if weight is not None else 1.0, check_eps(eps), ws, bs, tuple(x.shape),
                       _rows(x), rows_per_chunk(registry, backend, x, (ws, bs)), backend)


def make_rms_norm_problem(x, weight, eps, registry, backend: str) -> NormProblem:
    return _affine_norm_problem(False, x, weight, None, eps, registry, backend)


def make_layer_norm_problem(x, weight, bias, eps, registry, backend: str) -> NormProblem:
    return _affine_norm_problem(True, x, weight, bias, eps, registry, backend)


def make_gelu_tanh_problem(x, bias, registry, backend: str) -> ElementwiseProblem:
    check_tensor("x", x)
    layout = None
    if bias is not None:
        check_channel_vector("bias", bias, x)
        layout = OperandLayout.of(bias, x)
    return ElementwiseProblem(layout, tuple(x.shape), _rows(x), rows_per_chunk(registry, backend, x, (layout,)),
                              backend)


def make_gated_residual_problem(x, gate, y, registry, backend: str) -> ElementwiseProblem:
    check_tensor("x", x)
    check_tensor("gate", gate, ref=x, min_dim=0)
    check_tensor("y", y, ref=x)
    if y.shape != x.shape:
        raise ValueError(f"y: expected x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    check_broadcast("gate", gate, x)
    layout = OperandLayout.of(gate, x)
    R = _rows(x)
    return ElementwiseProblem(layout, tuple(x.shape), R, rows_per_chunk(registry, backend, x, (layout,)), backend)


def check_linear(x, weight, bias) -> None:
    check_tensor("x", x)
    check_tensor("weight", weight, ref=x, min_dim=2)
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight: expected shape (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ref=x)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
