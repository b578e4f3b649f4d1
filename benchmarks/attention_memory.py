"""Peak memory and wall time of attention JVP plus backward through both outputs, on the CPU.

For each sequence length N: torch.func.jvp over ``flowmap_kernels.attention`` (backend "torch",
blockwise, memory linear in N) against the same under backend "naive" (math attention, N x N scores),
then a backward of a loss on (O, tO) to all six inputs. Shape B1 H4 N D64 float32.

Each measurement runs in a fresh subprocess: peak memory = peak resident set (ru_maxrss) minus the
resident set once a tiny warm-up has run and the inputs exist ("above the start"); time = the faster of
two runs of JVP + backward.

    python benchmarks/attention_memory.py [--sizes 1024 2048 4096 8192 16384] [--out bench_out/attention_memory]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

B, H, D = 1, 4, 64
NAIVE_LIMIT_GIB = 16.0  # skip naive sizes whose N x N matrices would not fit beside the rest


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(backend: str, n: int) -> dict:
    import torch

    import flowmap_kernels as fk

    torch.manual_seed(0)

    def step(xs):
        with fk.use_backend(backend):
            o, to = torch.func.jvp(fk.attention, tuple(xs[:3]), tuple(xs[3:]))
            (o.sum() + (to * to).sum()).backward()
        for x in xs:
            x.grad = None

    step([torch.randn(B, H, 64, D, requires_grad=True) for _ in range(6)])  # one-time initialisation
    xs = [torch.randn(B, H, n, D, requires_grad=True) for _ in range(6)]
    start = _rss_bytes()
    t0 = time.perf_counter()
    step(xs)
    first = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    step(xs)
    second = time.perf_counter() - t0
    return {"backend": backend, "N": n, "peak_above_start_mib": (peak - start) / 2 ** 20,
            "seconds": min(first, second), "threads": torch.get_num_threads()}


def naive_estimate_gib(n: int) -> float:
    # about 10 N x N float32 matrices alive in the JVP + backward graph (measured: 9.4 GiB at N=8192)
    return 10 * B * H * n * n * 4 / 2 ** 30


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--backends", nargs="+", default=["torch", "naive"])
    ap.add_argument("--out", default="bench_out/attention_memory", help="writes <out>.csv and <out>.json")
    ap.add_argument("--one", nargs=2, metavar=("BACKEND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]))))
        return
    import torch

    from flowmap_kernels.attention.registry import ATTENTION
    from flowmap_kernels.bench.harness import (metadata, print_table, require_backends, require_ints, require_output,
                                               write_results)
    require_ints(ap, args, "sizes")  # usage errors before the first subprocess
    require_backends(ap, "--backends", args.backends, ATTENTION, device=torch.device("cpu"), dtype=torch.float32,
                     head_dim=D, v_head_dim=D)
    out = require_output(ap, args.out)
    rows = []
    for n in args.sizes:
        for backend in args.backends:
            if backend == "naive" and naive_estimate_gib(n) > NAIVE_LIMIT_GIB:
                rows.append({"backend": backend, "N": n, "peak_above_start_mib": None, "seconds": None,
                             "note": f"skipped: needs about {naive_estimate_gib(n):.0f} GiB"})
                continue
            res = subprocess.run([sys.executable, __file__, "--one", backend, str(n)], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cols = ["N", "backend", "peak_above_start_mib", "seconds", "threads", "note"]
    print_table(rows, cols)
    write_results(rows, out, meta=metadata("cpu"), columns=cols)


if __name__ == "__main__":
    main()
