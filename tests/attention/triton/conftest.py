"""Set-up for the Triton kernel tests: Triton's CPU interpreter, with its bfloat16 arithmetic fixed.

TRITON_INTERPRET=1 must be in the environment when a @triton.jit decorator runs (the decorator picks
the interpreter then), so it is set here at import time while the kernels' module is imported (and
re-imported if an earlier test imported it for a GPU build; the launch module reads the kernels through
that module object, so it needs no reload). The registry reads the variable at call time
(it lets CPU tensors reach the "triton" backend only under the interpreter), so it is set for each test
of this folder by an autouse fixture and restored afterwards: tests elsewhere in the same session see
the environment they started with (e.g. a named "triton" backend on CPU tensors falling back).

The interpreter's bfloat16 arithmetic is wrong in Triton 3.9 (bit patterns multiplied as integers,
float32 -> bfloat16 truncated); the package corrects it when its launch module is imported
(flowmap_kernels.attention.triton.interpreter); :func:`bf16_interpreter` switches the fix off and on, and
tests/attention/triton/test_interpreter_bf16.py proves it needed and right.
"""
import contextlib
import importlib
import os
import sys

_PRIOR = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

from flowmap_kernels.attention.triton import interpreter  # noqa: E402

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

def bf16_interpreter(fixed: bool):
    """The interpreter with (fixed=True) or without (False) the package's bfloat16 fix inside the block."""
    return interpreter.bf16_arithmetic(fixed)


@pytest.fixture(autouse=True, scope="package")
def bf16_interpreter_fix():
    """Every test in this folder runs with the bfloat16 fix (the launch module installs it; the proof test
    switches it off locally)."""
    with bf16_interpreter(True):
        yield
