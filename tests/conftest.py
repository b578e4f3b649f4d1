"""Suite-wide set-up.

- tests/ is importable as a package root (tests.reference).
- TRITON_INTERPRET=1 before anything imports triton: Triton decorates its own standard library
  (tl.zeros, ...) when triton.language is first imported, so the interpreter must be on from the very
  first import, not just when the kernel tests are collected. The "triton" backend still runs CPU tensors
  only when named explicitly; "auto" keeps the blockwise PyTorch path on the CPU.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test: tiny models on a shared 2-core machine run far
    faster without two OpenMP threads competing with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
