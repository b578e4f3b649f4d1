"""What Triton's CPU interpreter (TRITON_INTERPRET=1) lacks of the language the kernels use, added so that the
interpreter tests run the same kernel code as the GPU.

Triton 3.9's interpreter has no tensor-descriptor reduction (``desc.atomic_add``: ``cp.reduce.async.bulk.tensor``
on sm_90+, the one-pass backward's dQ / dtQ adds). :func:`install` gives it one with the hardware's semantics:
an element-wise relaxed atomic add of the tile at the descriptor's offsets, elements outside the descriptor's
shape dropped. A Triton whose interpreter has its own is left as it is.
"""
from __future__ import annotations


def _descriptor_reduce(self, kind, desc, value, indices):
    from triton._C.libtriton import ir
    if kind != ir.DESCRIPTOR_REDUCE_KIND.ADD:
        raise NotImplementedError(f"tensor-descriptor reduction {kind} in the interpreter (only ADD is added)")
    ptrs, mask = desc.materialize_pointers(indices)
    op = ir.ATOMIC_OP.FADD if value.dtype.scalar.is_floating() else ir.ATOMIC_OP.ADD
    self.create_atomic_rmw(op, ptrs, value, mask, ir.MEM_SEMANTIC.RELAXED, ir.MEM_SYNC_SCOPE.GPU)


def install() -> None:
    """Add the tensor-descriptor reduction to Triton's interpreter if it has none (idempotent)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:  # pragma: no cover - a Triton without the interpreter module
        return
    if not hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        InterpreterBuilder.create_descriptor_reduce = _descriptor_reduce
