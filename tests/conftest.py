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
