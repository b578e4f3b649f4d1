"""Exact FLOP counting (flowmap_kernels.bench.counting): linear and attention JVP counts, zero-operand
products, CPU peak memory."""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels import ops
from flowmap_kernels.bench.counting import count_flops, linear_jvp_is_fused, peak_memory

R, K, N = 6, 5, 7
FWD = 2 * R * K * N


def _xw(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g),
            torch.randn(R, K, generator=g))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_ops_linear_jvp_counts_twice_the_forward(backend):
    x, w, b, tx = _xw()
    f = lambda a: ops.linear(a, w, b)  # noqa: E731
    with fk.use_backend(backend):
        fwd = count_flops(lambda: f(x))
        jvp = count_flops(lambda: torch.func.jvp(f, (x,), (tx,)))
    assert fwd.total == FWD and fwd.zero == 0
    assert jvp.total == 2 * FWD, jvp.by_op  # one product on the stacked [x; tx], not 3x
    assert jvp.zero == 0
    assert linear_jvp_is_fused()


def test_nn_linear_jvp_phantom_product_is_excluded():
    """nn.Linear under torch.func.jvp multiplies x by a zero weight tangent: executed 3x, useful 2x."""
    x, w, b, tx = _xw(1)
    lin = torch.nn.Linear(K, N)
    c = count_flops(lambda: torch.func.jvp(lin, (x,), (tx,)))
    assert c.total == 3 * FWD
    assert c.zero == FWD
    assert c.useful == 2 * FWD


def test_linear_jvp_with_zero_input_tangent_counts_the_forward_only():
    x, w, b, _ = _xw(2)
    f = lambda a: ops.linear(a, w, b)  # noqa: E731
    c = count_flops(lambda: torch.func.jvp(f, (x,), (torch.zeros_like(x),)))
    assert c.total == 2 * FWD and c.zero == FWD and c.useful == FWD


def test_linear_jvp_backward_through_both_outputs_is_four_forwards():
    x, w, b, tx = _xw(3)
    w = w.clone().requires_grad_()
    x = x.clone().requires_grad_()

    def run():
        y, ty = torch.func.jvp(lambda a: ops.linear(a, w, b), (x,), (tx,))
        (y.square().sum() + ty.square().sum()).backward()
    c = count_flops(run)
    assert c.useful == 2 * FWD + 4 * FWD  # J + BJ


def test_zero_operand_matmuls_are_detected():
    a, z = torch.randn(4, 3), torch.zeros(3, 5)
    c = count_flops(lambda: (a @ z, torch.addmm(torch.ones(5), a, z), torch.bmm(a[None], z[None]), a @ z.abs().add(1)))
    assert c.total == 4 * (2 * 4 * 3 * 5)
    assert c.zero == 3 * (2 * 4 * 3 * 5)
    assert count_flops(lambda: a @ z, check_zeros=False).zero == 0


def test_attention_counts_forward_jvp_and_backward_through_both():
    B, H, L, D = 1, 2, 9, 4
    g = torch.Generator().manual_seed(5)
    q, k, v, tq, tk, tv = (torch.randn(B, H, L, D, generator=g) for _ in range(6))
    unit = 2 * B * H * L * L * D  # one product of the size of Q K^T
    assert count_flops(lambda: fk.attention(q, k, v)).total == 2 * unit
    assert count_flops(lambda: torch.func.jvp(fk.attention, (q, k, v), (tq, tk, tv))).total == 6 * unit
    qq = q.clone().requires_grad_()

    def both():
        o, to = torch.func.jvp(fk.attention, (qq, k, v), (tq, tk, tv))
        (o.square().sum() + to.square().sum()).backward()
    assert count_flops(both).total == (6 + 12) * unit


def test_peak_memory_cpu_sees_every_allocation():
    n = 250_000  # 1 MB of float32

    def fn():
        a = torch.ones(n)
        b = a + 1
        del a
        c = b * 2
        del b, c
    peak = peak_memory(fn, "cpu")
    assert 2 * 4 * n <= peak < 2 * 4 * n + 4096
    assert peak_memory(lambda: None, "cpu") == 0
