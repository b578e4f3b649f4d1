"""Set-up for the Triton kernel tests: Triton's CPU interpreter, with its bfloat16 arithmetic fixed.

TRITON_INTERPRET=1 must be in the environment when a @triton.jit decorator runs (the decorator picks
the interpreter then), so it is set here at import time while the kernels' module is imported (and
re-imported if an earlier test imported it for a GPU build; the launch module reads the kernels through
that module object, so it needs no reload). The registry reads the variable at call time
(it lets CPU tensors reach the "triton" backend only under the interpreter), so it is set for each test
of this folder by an autouse fixture and restored afterwards: tests elsewhere in the same session see
the environment they started with (e.g. a named "triton" backend on CPU tensors falling back).

The interpreter stores bfloat16 as raw uint16 patterns; Triton 3.9's ``create_dot`` multiplies those
patterns as integers, and its float32 -> bfloat16 conversion truncates where a GPU rounds to nearest
even. :func:`bf16_interpreter_fix` replaces both with correct versions (bf16 widened to float32 by a
16-bit shift; float32 -> bf16 by round-to-nearest-even on the bit pattern); the fix is proved by
tests/attention/triton/test_interpreter_bf16.py.
"""
import contextlib
import importlib
import os
import sys

_PRIOR = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

_KERNELS = "flowmap_kernels.attention.triton.kernels"
_MODULE = "flowmap_kernels.attention.triton.launch"


def ensure_interpreted_kernels():
    """The launch module (launchers, Plan, ...; its ``kernels`` the @triton.jit module), with the kernels'
    module imported (or re-imported in place, which the launch module sees) with TRITON_INTERPRET=1."""
    mod = sys.modules.get(_KERNELS)
    if mod is None or not isinstance(mod._attn_fwd, _interp.InterpretedFunction):
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            importlib.import_module(_KERNELS) if mod is None else importlib.reload(mod)
        finally:
            if before is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = before
    return importlib.import_module(_MODULE)


ensure_interpreted_kernels()


@contextlib.contextmanager
def interpreter_env():
    """TRITON_INTERPRET=1 inside the block (for @triton.jit decorations and registry checks)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def interpreted_jit(fn):
    """triton.jit(fn) as an interpreted function whatever the environment."""
    import triton
    with interpreter_env():
        return triton.jit(fn)


if _PRIOR is None:  # kernels are decorated: give the rest of the session its environment back
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def _interpret_env():
    """TRITON_INTERPRET=1 during the test; the registry's cached availability of "triton" is
    re-evaluated before and after (another test may have probed it without the interpreter)."""
    from flowmap_kernels.attention.registry import ATTENTION
    impl = ATTENTION.impls["triton"]
    with interpreter_env():
        impl._available_cache = None
        yield
    impl._available_cache = None

_Builder = _interp.InterpreterBuilder
_ORIGINAL = {"create_dot": _Builder.create_dot, "cast_impl": _Builder.cast_impl,
             "create_fp_to_fp": _Builder.create_fp_to_fp}


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit pattern (NaN kept quiet)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def _widen(h):
    if h.dtype.scalar == tl.bfloat16:
        return _bf16_to_f32(h.data)
    return h.data


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
        out = np.matmul(_widen(a), _widen(b), dtype=np.float32).astype(d.data.dtype) + d.data
        return _interp.TensorHandle(out, d.dtype.scalar)
    return _ORIGINAL["create_dot"](self, a, b, d, input_precision, max_num_imprecise_acc)


def _cast_impl(self, src, dst_type):
    s, t = src.dtype.scalar, dst_type.scalar
    if s == tl.bfloat16 and t == tl.bfloat16:
        return _interp.TensorHandle(src.data.copy(), t)
    if s == tl.bfloat16:
        return _ORIGINAL["cast_impl"](self, _interp.TensorHandle(_bf16_to_f32(src.data), tl.float32), dst_type)
    if t == tl.bfloat16:
        f32 = src.data if s == tl.float32 else src.data.astype(np.float32)
        return _interp.TensorHandle(_f32_to_bf16(f32), t)
    return _ORIGINAL["cast_impl"](self, src, dst_type)


def _create_fp_to_fp(self, src, dst_type, rounding_mode):
    if src.dtype.scalar == tl.bfloat16 or dst_type.scalar == tl.bfloat16:
        return _cast_impl(self, src, dst_type)
    return _ORIGINAL["create_fp_to_fp"](self, src, dst_type, rounding_mode)


_FIXED = {"create_dot": _create_dot, "cast_impl": _cast_impl, "create_fp_to_fp": _create_fp_to_fp}


@contextlib.contextmanager
def bf16_interpreter(fixed: bool):
    """Run the interpreter with (fixed=True) or without (False) the bfloat16 fix inside the block."""
    before = {name: getattr(_Builder, name) for name in _ORIGINAL}
    for name in _ORIGINAL:
        setattr(_Builder, name, (_FIXED if fixed else _ORIGINAL)[name])
    try:
        yield
    finally:
        for name, fn in before.items():
            setattr(_Builder, name, fn)


@pytest.fixture(autouse=True, scope="package")
def bf16_interpreter_fix():
    """Every test in this folder runs with the bfloat16 fix (removed after the folder); the proof test
    switches it off locally."""
    with bf16_interpreter(True):
        yield
