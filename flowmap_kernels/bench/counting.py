"""Exact FLOP counting, peak memory and the dual-aware linear used by the FPE benchmark.

``count_flops(fn)`` runs ``fn`` under :class:`ExactFlopCounter`: torch's FlopCounterMode (which counts
the package's custom ops with their registered formulas: attention forward 2 products, backward 4,
forward+JVP 6, backward through (O, tO) 12; the linear JVP's one product on the stacked [x; tx]) plus a
check of every matrix product's operands: a product with an identically zero operand (nn.Linear's JVP
multiplies x by a zero weight tangent under torch.func.jvp; a JVP whose input tangent is zero) is
counted separately as ``zero`` FLOPs, so ``total - zero`` counts only products that can change a result.
Elementwise ops count 0 (FlopCounterMode's convention).
"""
from __future__ import annotations

import gc
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "ExactFlopCounter", "count_flops", "peak_memory", "linear_jvp_is_fused"]

_aten = torch.ops.aten


def _zero(t) -> bool:
    return torch.is_tensor(t) and t.numel() > 0 and not bool(t.ne(0).any())


def _mm_flops(a, b) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm_flops(a, b) -> int:
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


# matrix products: (position of the first factor in the op's arguments, FLOP formula); addmm and baddbmm
# take the added term first
_PRODUCTS = ((_aten.mm, 0, _mm_flops), (_aten.addmm, 1, _mm_flops), (_aten.bmm, 0, _bmm_flops),
             (_aten.baddbmm, 1, _bmm_flops))


def _zero_part(packet, args) -> int:
    """FLOPs of the products inside one op call that have an identically zero operand."""
    for op, i, flops in _PRODUCTS:
        if packet is op:
            a, b = args[i], args[i + 1]
            return flops(a, b) if _zero(a) or _zero(b) else 0
    fk = getattr(torch.ops, "flowmap_kernels", None)
    if fk is None:
        return 0
    if packet is getattr(fk, "linear_jvp_forward", None):
        x, tx, w = args[0], args[1], args[2]
        R, K, N = x.shape[0], x.shape[1], w.shape[0]
        return 2 * R * K * N if _zero(tx) else 0
    if packet is getattr(fk, "linear_jvp_backward", None):
        x, tx, w, gy, gt = args[0], args[1], args[2], args[4], args[5]
        R, K, N = x.shape[0], x.shape[1], w.shape[0]
        z = 0
        if _zero(gy):
            z += 2 * (2 * R * N * K)  # gy W and gy^T x
        if _zero(gt):
            z += 2 * (2 * R * N * K)  # gt W and gt^T tx
        elif _zero(tx):
            z += 2 * R * N * K        # gt^T tx
        return z
    return 0


class ExactFlopCounter(FlopCounterMode):
    """FlopCounterMode that also records, per op, the FLOPs of products with an all-zero operand."""

    def __init__(self, check_zeros: bool = True):
        super().__init__(display=False)
        self.check_zeros = check_zeros
        self.zero_counts: dict = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if self.check_zeros and func_packet in self.flop_registry:
            z = _zero_part(func_packet, args)
            if z:
                self.zero_counts[str(func_packet)] += z
        return super()._count_flops(func_packet, out, args, kwargs)


@dataclass
class FlopCount:
    """total: every counted FLOP; zero: FLOPs of products with an identically zero operand;
    by_op: total per op name; zero_by_op: zero per op name. ``useful`` = total - zero."""
    total: int
    zero: int
    by_op: dict = field(default_factory=dict)
    zero_by_op: dict = field(default_factory=dict)

    @property
    def useful(self) -> int:
        return self.total - self.zero


def count_flops(fn, *, check_zeros: bool = True) -> FlopCount:
    """Run ``fn()`` once under :class:`ExactFlopCounter` and return its :class:`FlopCount`."""
    with ExactFlopCounter(check_zeros=check_zeros) as m:
        fn()
    by_op = {str(k): int(v) for k, v in m.get_flop_counts().get("Global", {}).items()}
    return FlopCount(int(m.get_total_flops()), int(sum(m.zero_counts.values())), by_op, dict(m.zero_counts))


def peak_memory(fn, device) -> int:
    """Peak bytes allocated by ``fn()`` on ``device`` above what was allocated when it started.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_stats. CPU: the running sum of the
    allocation and free events that torch.profiler records (profile_memory=True), which sees every
    tensor the CPU allocator hands out, temporaries inside custom ops included.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return int(peak)


# ---- the linear under forward mode -----------------------------------------------------------------

def linear_jvp_is_fused(device="cpu") -> bool:
    """True when ``flowmap_kernels.ops.linear`` under torch.func.jvp counts 2x its forward's FLOPs (one
    product on the stacked [x; tx]); False when it runs the primal product again (3x)."""
    from .. import ops
    w, x, tx = (torch.randn(s, device=device) for s in ((5, 3), (4, 3), (4, 3)))
    f = lambda a: ops.linear(a, w)  # noqa: E731
    fwd = count_flops(lambda: f(x)).total
    jvp = count_flops(lambda: torch.func.jvp(f, (x,), (tx,))).total
    return jvp == 2 * fwd
