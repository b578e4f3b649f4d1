"""GPU benchmark of the Triton attention kernels against PyTorch SDPA (needs a CUDA GPU).

    python benchmarks/bench_attention_gpu.py [--n 1024 2048 ... 32768] [--d 64 128] [--dtypes fp16 bf16]
                                             [--heads 16] [--tokens 32768] [--causal] [--deterministic]
                                             [--jvp-backward-config 32x64/w4/s2/split2 ...] [--out results/attn]

Times (triton.testing.do_bench, median of its repetitions, milliseconds) for each (N, D, dtype):

  ours      forward, backward (primal), forward+JVP (O and tO), backward through (O, tO) with dO and dtO
  baseline  SDPA flash forward and backward (torch.nn.attention.sdpa_kernel(FLASH_ATTENTION));
            SDPA math under torch.func.jvp (forward+JVP) and its backward through (O, tO) via autograd,
            skipped where its N x N intermediates would not fit (--math-mem-frac of GPU memory)

FLOP counts (non-causal, batch B, heads H; halve them for --causal), algorithmic, no recomputation:
  forward                     4 B H N^2 D        (Q K^T and P V)
  backward                    8 B H N^2 D        (2x forward: dQ, dK, dV, dP)
  forward+JVP                12 B H N^2 D        (3x forward: 6 products)
  backward through (O, tO)   24 B H N^2 D        (12 products)
Executed FLOPs count the products each implementation really runs, recomputation included: FlashAttention-2's
backward runs 5 products (2.5x its forward), ours too (the one-pass backward, dQ by atomics); our backward
through (O, tO) runs 15 products per tile for 16-bit head dims <= 64 (the minimum, docs/math.md section 1)
and 20 otherwise (three launches, two recomputing S and tS). Under --deterministic
(torch.use_deterministic_algorithms: dQ in a pass of its own) they are 7, and 21 / 28.
--jvp-backward-config also times the backward through (O, tO) with the named launch config forced on every
launch of that call (configs.override; impl "triton[<config>]"), e.g. the two-launch one-pass split the static
report ranks against the shipped one-launch kernel at D <= 64 (docs/triton.md); its executed FLOPs are not
counted (null). TFLOP/s = FLOPs / time, both ways (tflops: algorithmic, tflops_executed). Batch B = max(1, tokens // N).
The GPU (nvidia-ml-py), torch and triton versions are recorded with every row; results go to <out>.csv and <out>.json.

Without a CUDA GPU this script says so and exits 0; it never fabricates numbers.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

FLOP_FACTOR = {"forward": 4, "backward": 8, "jvp_forward": 12, "jvp_backward": 24}


def executed_factor(impl: str, kind: str, d: int, dtype_name: str, deterministic: bool = False) -> int:
    """FLOPs / (B H N^2 D) that ``impl`` executes for pass ``kind`` (2 per matrix product per tile; the
    products per tile of the compile report, docs/triton.md)."""
    small = dtype_name in ("bf16", "fp16") and d <= 64
    if kind == "backward":
        return 14 if impl == "triton" and deterministic else 10  # FA2 and the one-pass backward: 5 products
    if kind == "jvp_backward" and impl == "triton":
        if deterministic:
            return 42 if small else 56
        return 30 if small else 40
    return FLOP_FACTOR[kind]


def _bench(fn) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run_case(n, d, dtype_name, heads, tokens, causal, math_mem_frac, deterministic=False, jvp_backward_configs=()):
    """Rows of timings for one (N, D, dtype); ``jvp_backward_configs``: launch config names (configs.Config.parse)
    under which the backward through (O, tO) is timed again."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from flowmap_kernels.attention.triton import configs
    from flowmap_kernels.attention.triton import launch as ta

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    B, H = max(1, tokens // n), heads
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda: torch.randn(B, H, n, d, device=dev, dtype=dtype, generator=g)  # noqa: E731
    q, k, v, tq, tk, tv, do, dto = (mk() for _ in range(8))
    scale = 1.0 / math.sqrt(d)
    rows = []
    base = dict(n=n, d=d, dtype=dtype_name, batch=B, heads=H, causal=causal)

    def add(impl, kind, ms, note=""):
        unit = B * H * n * n * d * (0.5 if causal else 1.0)
        per_s = (lambda f: f * unit / (ms * 1e-3) / 1e12) if ms else (lambda f: None)
        executed = None if "[" in impl else per_s(executed_factor(impl, kind, d, dtype_name, deterministic))
        rows.append(dict(base, impl=impl, pass_=kind, ms=ms, tflops=per_s(FLOP_FACTOR[kind]),
                         tflops_executed=executed, deterministic=deterministic, note=note))
        shown = f"{ms:9.3f} ms {rows[-1]['tflops']:7.1f} TFLOP/s" if ms else f"{'-':>9s}    {note}"
        print(f"N={n:6d} D={d:3d} {dtype_name} B={B:3d} H={H:3d} {impl:12s} {kind:13s} {shown}", flush=True)

    # ours
    o, lse = ta.forward(q, k, v, None, causal, scale)
    add("triton", "forward", _bench(lambda: ta.forward(q, k, v, None, causal, scale)))
    add("triton", "backward", _bench(lambda: ta.backward(q, k, v, o, lse, do, None, causal, scale)))
    o2, to2, lse2, mu2 = ta.jvp_forward(q, k, v, tq, tk, tv, None, causal, scale)
    add("triton", "jvp_forward", _bench(lambda: ta.jvp_forward(q, k, v, tq, tk, tv, None, causal, scale)))
    add("triton", "jvp_backward", _bench(lambda: ta.jvp_backward(q, k, v, tq, tk, tv, o2, to2, lse2, mu2,  # noqa: F821
                                                                 do, dto, None, causal, scale)))
    for name in jvp_backward_configs:
        with configs.override(configs.Config.parse(name)):
            add(f"triton[{name}]", "jvp_backward", _bench(lambda: ta.jvp_backward(
                q, k, v, tq, tk, tv, o2, to2, lse2, mu2, do, dto, None, causal, scale)))  # noqa: F821
    del o2, to2, lse2, mu2  # free GPU memory before the math baseline (the lambda ran inside _bench)
    # SDPA flash
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        add("sdpa_flash", "forward", _bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)))
        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        of = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        add("sdpa_flash", "backward", _bench(lambda: torch.autograd.grad(of, (qg, kg, vg), do,  # noqa: F821
                                                                         retain_graph=True)))
        del of, qg, kg, vg
    # SDPA math under torch.func.jvp (holds B H N^2 scores several times)
    need = 6 * B * H * n * n * 4
    free = torch.cuda.mem_get_info()[0]
    if need > math_mem_frac * free:
        add("sdpa_math", "jvp_forward", None, f"skipped: ~{need / 2**30:.0f} GiB of N^2 intermediates")
        add("sdpa_math", "jvp_backward", None, "skipped")
    else:
        def math_attn(a, b, c):
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(a, b, c, is_causal=causal)
        add("sdpa_math", "jvp_forward", _bench(lambda: torch.func.jvp(math_attn, (q, k, v), (tq, tk, tv))))
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
        om, tom = torch.func.jvp(math_attn, tuple(leaves[:3]), tuple(leaves[3:]))
        add("sdpa_math", "jvp_backward", _bench(lambda: torch.autograd.grad((om, tom), leaves, (do, dto),
                                                                              retain_graph=True)))
        del om, tom, leaves
    torch.cuda.empty_cache()
    return rows


def check_args(ap, a) -> None:
    """Usage errors before any GPU work: sizes >= 1, head dims the Triton kernels take (<= 256), a memory
    fraction >= 0, launch config names that parse."""
    from flowmap_kernels.bench.harness import require_ints
    require_ints(ap, a, "n", "d", "heads", "tokens")
    if max(a.d) > 256:
        ap.error(f"--d: expected head dims <= 256 (the Triton kernels' range), got {' '.join(map(str, a.d))}")
    if not a.math_mem_frac >= 0:  # NaN too
        ap.error(f"--math-mem-frac: expected a fraction >= 0 of the free GPU memory, got {a.math_mem_frac}")
    if a.jvp_backward_config:
        from flowmap_kernels.attention.triton import configs
        for name in a.jvp_backward_config:
            try:
                configs.Config.parse(name)
            except ValueError as e:
                ap.error(f"--jvp-backward-config: {str(e).split(': ', 1)[-1]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--d", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32768, help="batch = max(1, tokens // N)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--math-mem-frac", type=float, default=0.5)
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True): the backwards' dQ in a pass of its own")
    ap.add_argument("--jvp-backward-config", nargs="*", default=[], metavar="CONFIG",
                    help="also time the backward through the JVP with this launch config forced "
                         "(e.g. 32x64/w4/s2/split2)")
    ap.add_argument("--out", type=Path, default=Path("results/bench_attention_gpu"))
    a = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to benchmark")
        return 0
    check_args(ap, a)  # usage errors (exit status 2) with or without a GPU
    if not torch.cuda.is_available():
        print("No CUDA GPU available: this benchmark needs one; no numbers were produced.")
        return 0
    from flowmap_kernels.bench.harness import metadata, require_output, write_results
    out = require_output(ap, a.out)
    meta = metadata("cuda")
    rows = []
    torch.use_deterministic_algorithms(a.deterministic, warn_only=True)
    for dt in a.dtypes:
        for d in a.d:
            for n in a.n:
                rows += run_case(n, d, dt, a.heads, a.tokens, a.causal, a.math_mem_frac, a.deterministic,
                                 a.jvp_backward_config)
    for r in rows:
        r["gpu"] = meta.get("gpu_name", meta.get("cuda_device_name"))
    write_results(rows, out, meta=meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
