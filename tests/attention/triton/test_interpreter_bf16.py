"""Proof that the package's fix of the interpreter's bfloat16 arithmetic (attention/triton/interpreter.py) is
needed and works: a bf16 tl.dot and a float32 -> bf16 cast."""
import torch
import triton.language as tl

from .conftest import bf16_interpreter, interpreted_jit


def _dot_and_cast(A, B, C, X, Y, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(A + r[:, None] * N + r[None, :])
    b = tl.load(B + r[:, None] * N + r[None, :])
    tl.store(C + r[:, None] * N + r[None, :], tl.dot(a, b))          # bf16 x bf16 -> fp32
    x = tl.load(X + r[:, None] * N + r[None, :])                      # fp32
    tl.store(Y + r[:, None] * N + r[None, :], x.to(tl.bfloat16))      # fp32 -> bf16


_dot_and_cast = interpreted_jit(_dot_and_cast)


def _run(n=16):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).bfloat16()
    b = torch.randn(n, n, generator=g).bfloat16()
    x = torch.randn(n, n, generator=g)
    c = torch.empty(n, n)
    y = torch.empty(n, n, dtype=torch.bfloat16)
    _dot_and_cast[(1,)](a, b, c, x, y, N=n)
    return c, a.float() @ b.float(), y, x.bfloat16()  # torch casts with round-to-nearest-even


def test_bf16_interpreter_is_wrong_without_the_fix():
    with bf16_interpreter(False):
        c, c_ref, y, y_ref = _run()
    assert not torch.allclose(c, c_ref, rtol=1e-2, atol=1e-2)  # products of raw 16-bit patterns
    assert (y != y_ref).float().mean() > 0.2                   # truncation instead of rounding


def test_bf16_interpreter_fixed():
    with bf16_interpreter(True):
        c, c_ref, y, y_ref = _run()
    torch.testing.assert_close(c, c_ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(y, y_ref)


def test_bf16_rounding_ties_to_even():
    import numpy as np

    from flowmap_kernels.attention.triton.interpreter import f32_to_bf16 as _f32_to_bf16
    # 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0);
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: goes up to 1 + 2^-6.
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), np.nan], dtype=np.float32)
    got = torch.from_numpy(_f32_to_bf16(x).view(np.int16)).view(torch.bfloat16)
    want = torch.from_numpy(x).bfloat16()
    assert torch.equal(got[:3], want[:3]) and torch.isnan(got[3])


def test_bf16_attention_right_outside_the_test_suite():
    """A user's process (no test fixture): TRITON_INTERPRET=1 and the "triton" backend on bfloat16 CPU tensors
    give bf16-accurate outputs and gradients, because the launch module installs the fix (without it the
    interpreter's integer products of bit patterns returned garbage)."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, flowmap_kernels as fk\n"
        "torch.manual_seed(0)\n"
        "q, k, v, tq, tk, tv = (torch.randn(1, 2, 40, 32) for _ in range(6))\n"
        "with fk.use_backend('triton'):\n"
        "    o, to = fk.attention_jvp(*(x.bfloat16() for x in (q, k, v, tq, tk, tv)), is_causal=True)\n"
        "with fk.use_backend('naive'):\n"
        "    ro, rto = fk.attention_jvp(*(x.double() for x in (q, k, v, tq, tk, tv)), is_causal=True)\n"
        "err = max(float((a.double() - b).norm() / b.norm()) for a, b in ((o, ro), (to, rto)))\n"
        "print(err)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-2, res.stdout
