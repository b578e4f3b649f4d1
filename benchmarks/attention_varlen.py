"""Packed variable-length attention against padding: peak memory and time of a JVP plus the backward through
(O, tO), CPU float32, H4 D64.

Modes: ``varlen-torch`` (fk.attention_varlen, blockwise per sequence, no padding work), ``varlen-naive``
(per-sequence math attention), ``padded-torch`` (fk.attention on the sequences padded to the longest, with a
boolean key-padding mask). Each measurement runs in a fresh subprocess: peak resident set above the start,
wall time of one JVP + backward.

    python benchmarks/attention_varlen.py [--lengths 4096 1024 512 256 128 64] [--out bench_out/attention_varlen]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

H, D = 4, 64
MODES = ("varlen-torch", "varlen-naive", "padded-torch")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_one(mode: str, lengths: list) -> dict:
    import torch

    import flowmap_kernels as fk

    torch.manual_seed(0)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    total, batch, longest = sum(lengths), len(lengths), max(lengths)
    if mode.startswith("varlen"):
        backend = mode.split("-")[1]
        xs = [torch.randn(total, H, D, requires_grad=True) for _ in range(6)]

        def f(a, b, c):
            return fk.attention_varlen(a, b, c, cu, cu, longest, longest)
    else:
        backend = "torch"
        xs = [torch.randn(batch, H, longest, D, requires_grad=True) for _ in range(6)]
        keep = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
        mask = keep[:, None, None, :]

        def f(a, b, c):
            return fk.attention(a, b, c, attn_mask=mask)

    start = _rss_bytes()
    t0 = time.perf_counter()
    with fk.use_backend(backend):
        o, to = torch.func.jvp(f, tuple(xs[:3]), tuple(xs[3:]))
        (o.sum() + (to * to).sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "tokens": total, "sequences": batch, "peak_above_start_mib": (peak - start) / 2 ** 20,
            "seconds": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 1024, 512, 256, 128, 64])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default="bench_out/attention_varlen", help="writes <out>.csv and <out>.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(measure_one(a.one, a.lengths)))
        return
    from flowmap_kernels.bench.harness import metadata, print_table, require_ints, require_output, write_results
    require_ints(ap, a, "lengths")  # usage errors before the first subprocess
    out = require_output(ap, a.out)
    rows = []
    for mode in a.modes:
        res = subprocess.run([sys.executable, __file__, "--one", mode, "--lengths", *map(str, a.lengths)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print_table(rows, ["mode", "tokens", "sequences", "peak_above_start_mib", "seconds"])
    write_results(rows, out, meta=dict(metadata("cpu"), lengths=a.lengths, heads=H, head_dim=D))


if __name__ == "__main__":
    main()
