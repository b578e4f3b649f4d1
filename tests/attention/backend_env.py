"""Run a test body on one attention backend; "triton" runs CPU tensors in Triton's interpreter.

The "triton" backend serves CPU tensors only with TRITON_INTERPRET=1 and the backend named explicitly; its
kernels module must have been decorated under the interpreter, and Triton 3.9's interpreter needs the
bfloat16 fix of tests/attention/triton/conftest.py. Parametrize with ``BACKENDS`` (the triton entry carries
the ``interpreter`` marker).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import flowmap_kernels as fk

BACKENDS = ["naive", "torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def dtypes_of(backend: str) -> list:
    """The input dtypes a backend serves (Triton has no float64)."""
    low = [torch.float32, torch.float16, torch.bfloat16]
    return low if backend == "triton" else [torch.float64] + low


@contextlib.contextmanager
def on_backend(backend: str):
    """``fk.use_backend(backend)`` (with the interpreter set up for "triton")."""
    if backend != "triton":
        with fk.use_backend(backend):
            yield
        return
    from flowmap_kernels.attention.registry import ATTENTION
    from tests.attention.triton.conftest import ensure_interpreted_kernels, interpreter_env
    ensure_interpreted_kernels()  # (its launch module installs the interpreter's bfloat16 fix)
    impl = ATTENTION.impls["triton"]
    with interpreter_env():
        impl._available_cache = None
        try:
            with fk.use_backend("triton"):
                yield
        finally:
            impl._available_cache = None
