"""FLOP accounting: FlopCounterMode sees the package's attention with the matmul FLOPs of the math."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flowmap_kernels as fk
from tests.attention.cases import Case


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


CASE = Case(batch=2, q_heads=4, kv_heads=2, q_len=24, kv_len=40, head_dim=8, v_head_dim=12)
B, H, LQ, LK, D, DV = 2, 4, 24, 40, 8, 12
QK = 2 * B * H * LQ * LK * D  # one product the size of Q K^T
PV = 2 * B * H * LQ * LK * DV  # one product the size of P V


def _workloads(t):
    kw = CASE.kwargs
    xs = [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]

    def forward():
        fk.attention(*xs[:3], **kw)

    def forward_backward():
        fk.attention(*xs[:3], **kw).sum().backward()

    def jvp():
        torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(xs[:3]), tuple(xs[3:]))

    def jvp_backward_both():
        o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(xs[:3]), tuple(xs[3:]))
        (o.sum() + (to ** 2).sum()).backward()

    return {"forward": forward, "forward_backward": forward_backward, "jvp": jvp,
            "jvp_backward_both": jvp_backward_both}


EXPECTED = {
    "forward": QK + PV,
    "forward_backward": 3 * (QK + PV),
    "jvp": 3 * (QK + PV),
    "jvp_backward_both": 9 * (QK + PV),
}


@pytest.mark.parametrize("work", list(EXPECTED))
def test_flop_counts_match_the_naive_math(work):
    """The blockwise backend (custom ops with formulas) and the naive math (aten matmuls) count alike."""
    t = CASE.make(torch.float32, requires_grad=True)
    counts = {}
    for backend in ("torch", "naive"):
        with fk.use_backend(backend):
            counts[backend] = _count(_workloads(t)[work])
    assert counts["torch"] == EXPECTED[work]
    assert counts["naive"] == EXPECTED[work]


def test_forward_mode_stays_intact_under_flop_counter():
    t = CASE.make(torch.float64)
    xs = [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]
    with FlopCounterMode(display=False):
        _, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **CASE.kwargs), tuple(xs[:3]), tuple(xs[3:]))
    with fk.use_backend("naive"):
        _, ref = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **CASE.kwargs), tuple(xs[:3]), tuple(xs[3:]))
    assert to.abs().sum() > 0
    assert torch.allclose(to, ref, rtol=1e-10, atol=1e-12)
