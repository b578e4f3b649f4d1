"""Argument checking and the row layout shared by every fused op.

Every op works on rows: ``x`` of shape (..., C) is viewed as (R, C) with R = prod(...). A per-channel
operand (shift, scale, gate, weight, bias) broadcastable to ``x`` is described by a :class:`ModSpec`:
when its leading dims are a prefix of ``x``'s followed by ones (``(C,)``, ``(B, 1, C)``, ``(B, N, C)``),
it is a contiguous (M, C) table and row r uses table row ``r // (R // M)`` (no copy); any other
broadcast (``(1, N, C)``, a trailing 1) is expanded to (R, C) and its gradient summed back.
Bad input raises ``ValueError`` / ``TypeError`` naming the argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

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
    """A tangent is None (zero) or a tensor with its primal's shape, dtype and device."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != primal.shape or t.dtype != primal.dtype or t.device != primal.device:
        raise ValueError(f"{name}: expected shape {tuple(primal.shape)}, {primal.dtype} on {primal.device}; "
                         f"got {tuple(t.shape)}, {t.dtype} on {t.device}")
    return t


def check_broadcast(name: str, m: torch.Tensor, x: torch.Tensor) -> None:
    try:
        full = torch.broadcast_shapes(m.shape, x.shape)
    except RuntimeError:
        full = None
    if full != x.shape:
        raise ValueError(f"{name}: shape {tuple(m.shape)} is not broadcastable to x's shape {tuple(x.shape)}")


@dataclass(frozen=True)
class ModSpec:
    """How a broadcast operand of shape ``shape`` maps onto the (R, C) rows of ``x``.

    ``rows`` = M table rows; ``grouped`` True: the operand is a (M, C) view with row r -> r // (R // M);
    False: it is expanded to (R, C) (M = R) and gradients are summed back to ``shape``.
    """

    shape: tuple
    x_shape: tuple
    rows: int
    grouped: bool

    @staticmethod
    def of(m: torch.Tensor, x: torch.Tensor) -> "ModSpec":
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
            return ModSpec(ms, xs, M, True)
        return ModSpec(ms, xs, R, False)

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
    import math
    g = 0
    for n in rows_per_group:
        g = math.gcd(g, int(n))
    g = max(g, 1)
    best = 1
    for d in range(1, min(g, max(target, 1)) + 1):
        if g % d == 0:
            best = d
    return best
