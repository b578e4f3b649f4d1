"""Launches per training step, eager against torch.compile, for the package's DiT on CPU; and the compile time.

One step = loss with its JVP + backward + gradient clipping + Adam (flowmap_kernels.compiled_step.TrainStep,
the same code in every mode). Modes:

  eager-func-jvp   eager, the JVP by torch.func.jvp (forward-mode AD through the Functions' jvp rules)
  eager-dual       eager, the JVP by the model's dual form (DiT.forward_jvp: explicit-tangent fused ops)
  compiled         torch.compile(fullgraph=True) of the whole step (dual form), backend inductor by default

"launches" = the outermost op events of one step in torch.profiler (aten ops, the package's custom ops,
inductor's fused CPU kernels, recorded with torch._inductor.config.cpp.enable_kernel_profile; an event
nested in a counted one is not counted again, wrapper events such as "Torch-Compiled Region" are not
counted). Step time: median wall time of --steps steps after warm-up. compile s: wall time of the first
compiled call minus one steady step (tracing + compilation), with inductor's caches disabled (a cold
compile) unless --warm-cache.

    python benchmarks/compiled_step.py [--methods meanflow tvm scm] [--backend inductor] [--steps 5]

Prints a table and writes bench_out/compiled_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import flowmap_kernels as fk
from flowmap_kernels.bench.harness import require_divides, require_ints, require_multiple, require_names, require_output
from flowmap_kernels.compiled_step import TrainStep
from flowmap_kernels.methods import meanflow, scm, tvm
from flowmap_kernels.nn import DiT

METHODS = {"meanflow": meanflow, "tvm": tvm, "scm": scm}
COUNTED_PREFIXES = ("aten::", "flowmap_kernels::", "triton_")


def counted(name: str) -> bool:
    """An op or kernel launch: aten / custom ops, inductor's fused CPU kernels (graph_<i>_cpp_fused_*)."""
    return name.startswith(COUNTED_PREFIXES) or "cpp_fused" in name


class NoDualForm(torch.nn.Module):
    """The same network without ``forward_jvp``: flowmap_kernels.func.jvp then runs torch.func.jvp."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def __getattr__(self, name):  # the network's other attributes (sCM's loss_weight), never its dual form
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "forward_jvp":
                raise
            return getattr(self.net, name)


def count_launches(prof) -> dict:
    """Outermost counted events of a profile, by name."""
    counts: dict = {}
    for ev in prof.events():
        if not counted(ev.name):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            if counted(parent.name):
                nested = True
                break
            parent = parent.cpu_parent
        if not nested:
            counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


def build(args, name):
    torch.manual_seed(0)
    m = DiT(input_size=args.input_size, patch_size=2, hidden_size=args.hidden, depth=args.depth,
            num_heads=args.heads, freq_dim=64)
    return scm.prepare_model(m) if name == "scm" else m


def measure(args, name, mode):
    method = METHODS[name]
    model = build(args, name)
    net = NoDualForm(model) if mode == "eager-func-jvp" else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99))
    compile_mode = "none" if mode.startswith("eager") else "default"
    step = TrainStep(net, method, opt, compile=compile_mode, backend=args.backend if compile_mode != "none" else None,
                     grad_clip=1.0)
    x0 = torch.randn(args.batch, 1, args.input_size, args.input_size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(2))
    t0 = time.perf_counter()
    step(x0, y)  # warm-up (and compilation)
    first = time.perf_counter() - t0
    step(x0, y)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x0, y)
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x0, y)
    counts = count_launches(prof)
    step_s = statistics.median(times)
    fused = {k: v for k, v in counts.items() if k.startswith("flowmap_kernels::")}
    return {"method": name, "mode": mode, "launches": sum(counts.values()), "fused_op_launches": sum(fused.values()),
            "fused_ops": dict(sorted(fused.items())), "step_s": step_s,
            "compile_s": (first - step_s) if compile_mode != "none" else None,
            "top_events": dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])}


def check_args(ap, args) -> None:
    """Usage errors before any work: sizes and steps >= 1 (a median of no steps), the DiT's shape (heads
    dividing hidden, patch 2 dividing the input), a torch.compile backend that exists."""
    require_ints(ap, args, "batch", "input_size", "hidden", "depth", "heads", "steps")
    require_divides(ap, args, "heads", "hidden")
    require_multiple(ap, args, "input_size", 2, "the patch size")
    from torch._dynamo import list_backends
    require_names(ap, "--backend", [args.backend], [b for b in list_backends(exclude_tags=()) if "TESTING" not in b],
                  "torch.compile backend")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=["eager-func-jvp", "eager-dual", "compiled"],
                    choices=["eager-func-jvp", "eager-dual", "compiled"])
    ap.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled mode")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--input-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="bench_out/compiled_step.json")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches (default: cold compile)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.backend == "inductor":
        import torch._inductor.config as icfg
        icfg.cpp.enable_kernel_profile = True  # inductor's fused CPU kernels appear as profiler events
        icfg.force_disable_caches = not args.warm_cache
    rows = []
    out = require_output(ap, args.out)

    def write():
        meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "backend": args.backend,
                "model": {"input_size": args.input_size, "patch": 2, "hidden": args.hidden, "depth": args.depth,
                          "heads": args.heads, "batch": args.batch, "dtype": "float32"},
                "attention_backend": "torch (blockwise)", "cpu_count": os.cpu_count(),
                "inductor_caches": "warm" if args.warm_cache else "disabled (cold compile)"}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    with fk.use_backend("torch"):
        for name in args.methods:
            for mode in args.modes:
                torch._dynamo.reset()
                rows.append(measure(args, name, mode))
                write()  # after every row: a partial run keeps what it measured
                r = rows[-1]
                comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f} s"
                print(f"{name:9s} {mode:15s} launches {r['launches']:5d}  fused {r['fused_op_launches']:3d}  "
                      f"step {r['step_s'] * 1e3:8.1f} ms  compile {comp}", flush=True)
    print()
    print("| method | mode | launches / step | fused-op launches | step ms | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        print(f"| {r['method']} | {r['mode']} | {r['launches']} | {r['fused_op_launches']} | {r['step_s'] * 1e3:.1f} "
              f"| {comp} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
