"""How the tests measure numerical error: one relative error, one tolerance table, one bound against PyTorch.

* :func:`rel_err` -- the relative error in the Euclidean (Frobenius) norm over all elements,
  ``||actual - expected||_2 / ||expected||_2``, evaluated in float64. Every suite uses it.
* :data:`TOLERANCE` -- the bound on :func:`rel_err` per dtype, for a result against its float64 reference
  (tests/reference.py) or against another package path run in the same dtype; :func:`tolerance` adds a
  stated number of accumulation roundoffs for results that amplify them.
* :func:`assert_within_2x_torch` -- for float16 / bfloat16, a bound relative to what PyTorch itself
  achieves in that precision: the kernel's error may be at most twice that of a same-precision PyTorch
  computation of the same quantity (plus a small floor), checked beside the fixed tolerances.
"""
from __future__ import annotations

import torch

# Unit roundoff of each dtype (half the distance from 1 to the next float): 2^-53, 2^-24, 2^-11, 2^-8.
UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}

# Bound on rel_err(result in dtype, float64 reference on the same rounded inputs), per dtype: values,
# tangents and gradients of a loss on both. Each entry sits just above the worst error measured over the
# suites (ops, attention blockwise / Triton interpreter, methods, distributed) and no looser than any
# suite's former bound re-derived for this norm.
TOLERANCE = {
    # float64: exact up to summation order: ~n u for n-term sums (u = 1.1e-16); measured worst 1.3e-14
    # (attention logits up to ~1e2 through exp). 1e-11 leaves 1e3 of room.
    torch.float64: 1e-11,
    # float32: inputs are exact float32 (no input rounding); products and sums accumulate in float32
    # (u = 2^-24 = 6e-8): ~10-25 u. Measured worst 1.5e-6 (Triton interpreter primal dk; blockwise attention
    # and the minibatch marginal velocity 1.2e-6), 6e-7 for the row ops. Attention's gradients through the
    # tangent in the Triton kernels need more: tolerance(dtype, 400) (tests/attention/triton).
    torch.float32: 2.5e-6,
    # float16: inputs and outputs are rounded to 11 significant bits (u = 2^-11 = 4.9e-4), intermediates
    # that kernels round to float16 (P, dS before their products) add a few more; accumulation in float32.
    # Measured worst 1.1e-3 (2.3 u, row ops' gradients), attention 8e-4.
    torch.float16: 5e-3,
    # bfloat16: as float16 with 8 significant bits (u = 2^-8 = 3.9e-3): a result rounded to bfloat16 is
    # off by up to u per element, its gradients inherit one or two more roundings. Measured worst 7.9e-3
    # (2 u, naive row ops' gradients), attention 6.2e-3.
    torch.bfloat16: 9.5e-3,
}


def tolerance(dtype: torch.dtype, amplification: float = 0.0) -> float:
    """TOLERANCE[dtype] plus ``amplification`` unit roundoffs of the accumulation dtype (float32; float64
    for float64 inputs).

    For results whose accumulation error a computation amplifies (sums of terms that cancel, large logits):
    the added term is what the float32 entry cannot absorb, and it vanishes beside the 16-bit entries
    (400 float32 roundoffs = 2.4e-5 against 5e-3 / 9.5e-3). Each use states its amplification and why."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return TOLERANCE[dtype] + amplification * UNIT_ROUNDOFF[acc]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected||_2 / ||expected||_2`` (Euclidean norm over all elements) in float64.

    When ``expected`` is all zeros the absolute error ``||actual||_2`` is returned instead (0 when both
    are zero). NaN anywhere in ``actual`` gives NaN, which fails every ``<=`` bound."""
    a, b = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num if den == 0 else num / den


def assert_within_2x_torch(actual, expected64, torch_same_precision, floor: float | None = None,
                           what: str = "") -> float | None:
    """Assert rel_err(actual) <= 2 rel_err(torch_same_precision) + floor, both against ``expected64``.

    ``torch_same_precision`` is the same quantity computed by plain PyTorch in the dtype of ``actual``
    (math attention under torch.func.jvp with inputs and outputs in that dtype, e.g. the "naive"
    backend), on the same rounded inputs. The floor (default 1/16 of the dtype's unit roundoff)
    only matters when PyTorch happens to be almost exact (e.g. a gradient that is exactly zero). Returns the
    ratio err(actual) / err(torch), None when PyTorch's error is zero."""
    if floor is None:
        floor = UNIT_ROUNDOFF[actual.dtype] / 16
    e, e_torch = rel_err(actual, expected64), rel_err(torch_same_precision, expected64)
    assert e <= 2 * e_torch + floor, (
        f"{what}: error {e:.3e} > 2 x {e_torch:.3e} (same-precision PyTorch) + {floor:.1e}")
    return e / e_torch if e_torch > 0 else None
