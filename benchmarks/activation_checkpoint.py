"""Peak memory and time of one TVM training step with activation checkpointing none / blocks / selective.

A TVM step (flowmap_kernels.methods "tvm": a JVP of the model with a backward through it, a stopped
teacher forward, a flow-matching forward with backward) on the package DiT, CPU, float32; defaults:
depth 8, input 64 x 64 with patch 2 (1024 tokens), hidden 128, 4 heads, batch 2. Modes:

    none       no checkpointing
    blocks     every DiT block through flowmap_kernels.checkpoint (recomputed in the backward)
    selective  the same, keeping the attention kernels' outputs (attention is not recomputed)

Each mode runs in a fresh subprocess: a warm-up step on a tiny input (one-time initialisations), then
freed heap memory is returned to the system (malloc_trim), the kernel's resident-set high-water mark is
reset (/proc/self/clear_refs) and one step on the full input is measured, above the resident set just
before it: "held after forward" = resident set once the loss is computed (the activations kept for the
backward, what checkpointing removes), "peak" = high-water mark (VmHWM) over the step (activations,
the recomputed block's graph, gradients and kernel workspaces: the blockwise attention's tiles hold
about 2^21 scores each, 8 MiB in float32, whatever the depth and batch). Time = wall seconds of that
step (the machine may be shared). The subprocesses run with MALLOC_MMAP_THRESHOLD_=65536 (unless set):
glibc then maps every block of 64 KiB or more on its own and returns it when freed, so the resident set
follows the live tensors; with glibc's default (a threshold that grows with the largest freed block)
the heap fragments and the figures include memory the allocator holds but no tensor uses (DiT depth 8,
256 tokens, batch 2: peak reduction by blocks 1.75x instead of 4x). Writes
bench_out/activation_checkpoint.json and .csv.

    python benchmarks/activation_checkpoint.py [--depth 8 --input-size 64 --hidden 128 --batch 2]
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

MODES = ("none", "blocks", "selective")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (Linux needed)")


def measure_one(mode: str, cfg: dict) -> dict:
    import torch

    from flowmap_kernels.methods import get_method
    from flowmap_kernels.nn import DiT

    torch.set_num_threads(cfg["threads"])
    tvm = get_method("tvm")

    def build(input_size):
        torch.manual_seed(0)
        return DiT(input_size=input_size, patch_size=2, in_channels=4, hidden_size=cfg["hidden"],
                   depth=cfg["depth"], num_heads=cfg["heads"], num_classes=0,
                   checkpoint_blocks=False if mode == "none" else mode)

    def step(model, x0, seed, measure=False):
        """One TVM step; with measure: (loss, MiB held after the forward, MiB peak) above the start."""
        if measure:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back: the start is what is live
            _reset_peak_rss()
            start = _rss_bytes()
        loss, _ = tvm.loss(model, x0, generator=torch.Generator().manual_seed(seed))
        held = _rss_bytes() if measure else 0
        loss.backward()
        model.zero_grad(set_to_none=True)
        if not measure:
            return float(loss)
        return float(loss), (held - start) / 2 ** 20, (_peak_rss_bytes() - start) / 2 ** 20

    tiny = build(8)
    step(tiny, torch.randn(1, 4, 8, 8), 0)  # one-time initialisations (kernels, extension)
    del tiny
    model = build(cfg["input_size"])
    x0 = torch.randn(cfg["batch"], 4, cfg["input_size"], cfg["input_size"], generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    loss, held, peak = step(model, x0, 2, measure=True)
    seconds = time.perf_counter() - t0
    tokens = (cfg["input_size"] // 2) ** 2
    return {"mode": mode, "held_after_forward_mib": held, "peak_above_start_mib": peak, "seconds": seconds,
            "loss": loss, "tokens": tokens, **cfg}


def versus(base, value, digits: int) -> str:
    """``value`` against ``base`` in words: "4.0x less", "1.20x more", "same" ("-" without a positive pair)."""
    if base is None or value is None or base <= 0 or value <= 0:
        return "-"
    if round(base / value, digits) == 1 or round(value / base, digits) == 1:
        return "same"
    return f"{base / value:.{digits}f}x less" if value < base else f"{value / base:.{digits}f}x more"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default="bench_out/activation_checkpoint")
    ap.add_argument("--one", metavar="MODE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from flowmap_kernels.bench.harness import require_divides, require_ints, require_multiple, require_output
    require_ints(ap, args, "depth", "input_size", "hidden", "heads", "batch", "threads")  # before any subprocess
    require_divides(ap, args, "heads", "hidden")
    require_multiple(ap, args, "input_size", 2, "the patch size")
    cfg = {"depth": args.depth, "input_size": args.input_size, "hidden": args.hidden, "heads": args.heads,
           "batch": args.batch, "threads": args.threads}
    if args.one:
        print(json.dumps(measure_one(args.one, cfg)))
        return
    require_output(ap, args.out + ".json")
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # see the module docstring
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{mode:>10}: held after forward {rows[-1]['held_after_forward_mib']:7.1f} MiB, peak "
              f"{rows[-1]['peak_above_start_mib']:7.1f} MiB above start, {rows[-1]['seconds']:6.2f} s", flush=True)
    base = next((r for r in rows if r["mode"] == "none"), None)
    print(f"\nTVM step, DiT depth {cfg['depth']}, {rows[0]['tokens']} tokens, hidden {cfg['hidden']}, "
          f"batch {cfg['batch']}, float32, CPU ({cfg['threads']} threads)")
    print("| mode | held after forward MiB | vs none | peak MiB | vs none | seconds | vs none |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        for key, name in (("held_after_forward_mib", "held"), ("peak_above_start_mib", "peak")):
            r[f"{name}_reduction_vs_none"] = base[key] / r[key] if base and r[key] > 0 else None
        r["time_ratio_vs_none"] = r["seconds"] / base["seconds"] if base else None
        cols = [versus(base and base["held_after_forward_mib"], r["held_after_forward_mib"], 1),
                versus(base and base["peak_above_start_mib"], r["peak_above_start_mib"], 2),
                f"{r['time_ratio_vs_none']:.2f}x" if base else "-"]
        print(f"| {r['mode']} | {r['held_after_forward_mib']:.1f} | {cols[0]} | {r['peak_above_start_mib']:.1f} | "
              f"{cols[1]} | {r['seconds']:.2f} | {cols[2]} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=2)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}.json and .csv")


if __name__ == "__main__":
    main()
