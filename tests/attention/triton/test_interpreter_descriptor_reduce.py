"""The tensor-descriptor reduction the package adds to Triton's interpreter (attention.triton.interpreter): what
the one-pass backward's dQ / dtQ adds run in the interpreter tests, with the hardware's semantics."""
import torch
import triton.language as tl

from flowmap_kernels.attention.triton import interpreter

from .conftest import interpreted_jit


def _add_rows(OUT, X, n_rows, STARTS: tl.constexpr, BLOCK_R: tl.constexpr, C: tl.constexpr):
    desc = tl.make_tensor_descriptor(OUT, [n_rows, C], [C, 1], [BLOCK_R, C])
    r = tl.arange(0, BLOCK_R)
    c = tl.arange(0, C)
    x = tl.load(X + r[:, None] * C + c[None, :])
    for i in tl.static_range(len(STARTS)):
        desc.atomic_add([STARTS[i], 0], x)


_add_rows = interpreted_jit(_add_rows)


def test_descriptor_atomic_add_adds_inside_the_shape_and_drops_the_rest():
    interpreter.install()
    n_rows, block, cols = 6, 4, 16
    x = torch.arange(block * cols, dtype=torch.float32).reshape(block, cols) + 0.5
    out = torch.full((n_rows + 3, cols), 7.0)  # rows past n_rows: outside the descriptor, never written
    _add_rows[(1,)](out, x, n_rows, STARTS=(0, 4, 4), BLOCK_R=block, C=cols)
    want = torch.full((n_rows + 3, cols), 7.0)
    want[:block] += x
    want[4:n_rows] += 2 * x[:n_rows - 4]
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_install_is_idempotent():
    from triton.runtime.interpreter import InterpreterBuilder
    interpreter.install()
    first = InterpreterBuilder.create_descriptor_reduce
    interpreter.install()
    assert InterpreterBuilder.create_descriptor_reduce is first
