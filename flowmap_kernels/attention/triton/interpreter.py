"""What Triton's CPU interpreter (TRITON_INTERPRET=1) lacks or gets wrong of the language the kernels use, added
or corrected so that the interpreter runs the same kernel code as the GPU with the GPU's arithmetic.

- Triton 3.9's interpreter has no tensor-descriptor reduction (``desc.atomic_add``: ``cp.reduce.async.bulk.tensor``
  on sm_90+, the one-pass backward's dQ / dtQ adds). :func:`install` gives it one with the hardware's semantics:
  an element-wise relaxed atomic add of the tile at the descriptor's offsets, elements outside the descriptor's
  shape dropped. A Triton whose interpreter has its own is left as it is.
- Its bfloat16 arithmetic is wrong: it stores bfloat16 as raw uint16 patterns, ``create_dot`` multiplies those
  patterns as integers, and its float32 -> bfloat16 conversion truncates where a GPU rounds to nearest even (a
  bf16 attention under the interpreter returned garbage). :func:`install` replaces the three builder methods
  involved (:data:`BF16_FIX`: bf16 widened to float32 by a 16-bit shift, exact; float32 -> bf16 rounded to
  nearest even on the bit pattern) for bfloat16 operands only; every other dtype takes the original path.
  :func:`bf16_arithmetic` switches between the two (the tests prove the original wrong and the fix right).
"""
from __future__ import annotations

import contextlib

import numpy as np
import triton.language as tl


def _descriptor_reduce(self, kind, desc, value, indices):
    from triton._C.libtriton import ir
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"tensor-descriptor reduction {kind} in the interpreter (only ADD is added)")
    ptrs, mask = desc.materialize_pointers(indices)
    op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
    self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


# ---- bfloat16 ------------------------------------------------------------------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) as float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit pattern (uint16; NaN kept quiet)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


#: The interpreter builder's own methods that the bfloat16 fix replaces (filled by :func:`install`).
ORIGINAL: dict = {}


def _is_bf16(h) -> bool:
    return h.dtype.scalar == tl.bfloat16


def _handle(data, dtype):
    from triton.runtime.interpreter import TensorHandle
    return TensorHandle(data, dtype)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if _is_bf16(a) or _is_bf16(b):
        wide = [bf16_to_f32(h.data) if _is_bf16(h) else h.data for h in (a, b)]
        return _handle(np.matmul(*wide, dtype=np.float32).astype(d.data.dtype) + d.data, d.dtype.scalar)
    return ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)


def _cast_impl(self, src, dst_type):
    s, t = src.dtype.scalar, dst_type.scalar
    if s == tl.bfloat16 and t == tl.bfloat16:
        return _handle(src.data.copy(), t)
    if s == tl.bfloat16:
        return ORIGINAL["cast_impl"](self, _handle(bf16_to_f32(src.data), tl.float32), dst_type)
    if t == tl.bfloat16:
        return _handle(f32_to_bf16(src.data if s == tl.float32 else src.data.astype(np.float32)), t)
    return ORIGINAL["cast_impl"](self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    if src.dtype.scalar == tl.bfloat16 or dst_type.scalar == tl.bfloat16:
        return _cast_impl(self, src, dst_type)
    return ORIGINAL["create_fp_to_fp"](self, src, dst_type, rounding_mode)


#: The corrected builder methods (bfloat16 operands; the rest delegate to :data:`ORIGINAL`).
BF16_FIX = {"create_dot": _create_dot, "cast_impl": _cast_impl, "create_fp_to_fp": _create_fp_to_fp}


@contextlib.contextmanager
def bf16_arithmetic(fixed: bool):
    """Run the interpreter with (``fixed``) or without the bfloat16 fix inside the block (after :func:`install`)."""
    from triton.runtime.interpreter import InterpreterBuilder
    install()
    if not ORIGINAL:
        raise RuntimeError("this Triton's interpreter builder has none of the methods the bfloat16 fix replaces")
    before = {name: getattr(InterpreterBuilder, name) for name in ORIGINAL}
    for name in ORIGINAL:
        setattr(InterpreterBuilder, name, (BF16_FIX if fixed else ORIGINAL)[name])
    try:
        yield
    finally:
        for name, fn in before.items():
            setattr(InterpreterBuilder, name, fn)


def install() -> None:
    """Add the tensor-descriptor reduction to Triton's interpreter if it has none, and fix its bfloat16
    arithmetic (idempotent; a builder without those methods is left as it is)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:  # pragma: no cover - a Triton without the interpreter module
        return
    if not hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        InterpreterBuilder.create_descriptor_reduce = _descriptor_reduce
    if not ORIGINAL and all(callable(getattr(InterpreterBuilder, name, None)) for name in BF16_FIX):
        ORIGINAL.update({name: getattr(InterpreterBuilder, name) for name in BF16_FIX})
        for name, fn in BF16_FIX.items():
            setattr(InterpreterBuilder, name, fn)
