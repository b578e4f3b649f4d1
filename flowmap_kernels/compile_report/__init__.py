"""Ahead-of-time compile report: registers, spills, shared memory, tensor-core use and a static performance
report of every shipped Triton launch, for every GPU target a user may hold, without a GPU.

    python -m flowmap_kernels.compile_report [--arch sm_80 sm_86 sm_89 sm_90a sm_100a sm_120]
        [--head-dims 64 128] [--dtypes bf16] [--kernels forward jvp_forward] [--summary] [--json PATH]
        [--markdown PATH] [--no-cache]

The targets and their shared-memory limits come from :data:`configs.FAMILIES` (one source of truth): each
target compiles with the tiles its family's launcher picks (``configs.arch_family(target)``). Each Triton
launch, as the launchers describe it (``attention/triton/launch.py``: the same kernel, grid, arguments,
constexprs and config) for a problem with no mask, not causal, contiguous inputs, lengths that are
multiples of 16 and no GQA, is compiled (:mod:`.triton`, whose names this module re-exports) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` using the same argument specialisation
as Triton's JIT (integers equal to 1 become constants, integers and pointers divisible by 16 get the
divisibility hint). Triton emits the arch-specific targets
sm_90a, sm_100a and sm_120a for capabilities 90, 100 and 120 (``target`` in the records). Then

- registers and stack: ``cuobjdump --dump-resource-usage`` from the Triton wheel on the cubin;
- spill bytes: the local-memory stores and loads (STL / LDL) in the cubin's SASS (``cuobjdump -sass``):
  what ptxas -v reports, read from the binary Triton built with its own ptxas and flags;
- shared memory: the compiled kernel's metadata (dynamic shared memory per block);
- tensor cores (``mma``: "mma.sync", "wgmma", "tcgen05" or "none", read from the PTX), their shapes
  (``wgmma_shapes``: static instruction counts by shape, e.g. {"m64n64k16": 16}; mma.sync shapes, or
  tcgen05 kinds, on other targets), ``waits_per_iteration`` (``wgmma.wait_group 0`` in the key loop),
  ``async_loads`` (cp.async or TMA), ``products_per_tile`` (``tt.dot`` ops per key-loop iteration in the
  TTIR, :func:`ttir_products`), ``num_warps``, ``num_stages`` and ``shipped`` (:func:`is_shipped`).

:func:`summaries` adds one record per (pass, dtype, head dim, target): the products of the pass against
the mathematical minimum and a predicted time ratio to FlashAttention-2 from a first-order model
(:func:`launch_efficiency`; an ESTIMATE, documented in docs/triton.md). ``--summary`` prints that table.

Records are dicts ``{kernel, family, config, arch, dtype, head_dim, registers, spill_bytes, shared_bytes,
uses_wgmma, mma, ..., source}``. Sources are pluggable (:data:`RECORD_SOURCES`): the Triton attention
kernels, and ``flowmap_kernels.compile_report.cuda.cuda_records(archs)`` (CUDA C++ kernels) when that module
exists. Results are cached by a hash of the kernel sources, config, the launch's compile inputs, Triton version and
:data:`RECORD_VERSION` (``--no-cache`` to disable).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Optional

from .triton import (ARCHS, DEFAULT_HEAD_DIMS, DTYPE_NAMES, FAMILIES, RECORD_VERSION, SHARED_LIMIT,  # noqa: F401
                     TRITON_KERNELS, VARIANTS, _worker_main, async_loads, family, is_shipped, mma_kind, mma_shapes,
                     ptx_loops, ptx_main_loop, sass_spill_bytes, traps, triton_launches, triton_records,
                     ttir_products, waits_per_iteration)


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "flowmap_kernels", "compile_report.json")


# ---- static performance report: products per pass and a first-order time model (an ESTIMATE) ----------

#: Passes and their launches (base kernel names; the row pre-passes have no matrix products).
#: The backwards run the one-pass kernels (dQ by atomics) by default and the ``*_deterministic`` passes
#: under torch.use_deterministic_algorithms(True); the row pre-pass (no products) is counted with the former.
PASSES = {"forward": ("forward",), "backward": ("backward_prep", "backward_atomic"),
          "backward_deterministic": ("backward_dkdv", "backward_dq"),
          "jvp_forward": ("jvp_forward",), "jvp_forward_tma": ("jvp_forward_tma",),
          "jvp_forward_tangent_fp32": ("jvp_forward_tangent_fp32",),
          "jvp_backward": ("jvp_backward_prep", "jvp_backward_atomic"),
          "jvp_backward_deterministic": ("jvp_backward_dkdv", "jvp_backward_dq")}
#: The mathematical minimum of matrix products per (query block x key block) tile (docs/math.md section 1).
MINIMUM_PRODUCTS = {"forward": 2, "backward": 5, "backward_deterministic": 5, "jvp_forward": 6, "jvp_forward_tma": 6,
                    "jvp_forward_tangent_fp32": 6, "jvp_backward": 15, "jvp_backward_deterministic": 15}
#: FlashAttention-2's products per tile and the pass it is compared with (forward-type / backward-type).
FA2_PRODUCTS = {"forward": 2, "backward": 5}
FA2_PASS = {"forward": "forward", "jvp_forward": "forward", "backward": "backward", "jvp_backward": "backward",
            "backward_deterministic": "backward", "jvp_backward_deterministic": "backward",
            "jvp_forward_tangent_fp32": "forward", "jvp_forward_tma": "forward"}

#: The time model's assumptions (docs/triton.md, "Static performance report"). Only sm_90a (H100 SXM5) is
#: modelled, where both figures below were measured by the same paper (arXiv:2407.08608, its forward and
#: backward speed figures on an H100 80GB SXM5: bf16, head dim 128, sequence length 16k, not causal; dense
#: peak 989 TFLOP/s):
#: - FlashAttention-2: forward 370 TFLOP/s (0.37 of peak), backward 322 TFLOP/s (0.33);
#: - the Triton FlashAttention forward (wgmma, one full wgmma wait per key block, 3 stages): 395 TFLOP/s
#:   (0.40): the reference efficiency of a Triton wgmma kernel with that structure.
MODEL = {
    "sm_90a": dict(peak_tflops=989.0, triton_reference=0.40, fa2={"forward": 0.37, "backward": 0.33},
                   sm_registers=65536, sm_shared=233472, max_warps=64),
}
MODEL_FACTORS = dict(single_stage=0.8, one_warpgroup=0.75, spills=0.7, wgmma_full_width_n=64,
                     reference_products_per_wait=2)


def launch_efficiency(rec: dict) -> Optional[dict]:
    """First-order fraction of the tensor-core peak one launch reaches (an ESTIMATE), with its factors;
    None where the model has no figures (targets other than sm_90a, float32, no key loop).

    efficiency = triton_reference x width x waits x stages x occupancy x spills, each factor <= 1:
    width: useful FLOPs / FLOP-time of the key loop's wgmma m64nNk16, where a wgmma with N < 64 takes the
    time of an m64n64 one (m64n16 ~ 1/4 the throughput per issue); waits: min(1, products per
    ``wgmma.wait_group 0`` / 2) (the reference loop waits once per 2 products; each drain exposes the
    non-matrix work); stages: 0.8 with num_stages = 1 (no prefetch of the next key block); occupancy:
    0.75 when registers or shared memory leave one warpgroup per SM (nothing to run while it waits);
    spills: 0.7 with any spill.
    """
    m = MODEL.get(rec.get("arch"))
    if m is None or rec.get("dtype") == "fp32" or not rec.get("products_per_tile") or rec.get("mma") != "wgmma":
        return None
    f = MODEL_FACTORS
    shapes = rec.get("loop_mma_shapes") or rec.get("wgmma_shapes") or {}
    work = total = 0.0
    for shape, count in shapes.items():
        mm = re.fullmatch(r"m(\d+)n(\d+)k(\d+)", shape)
        if not mm:
            continue
        flops = int(mm.group(1)) * int(mm.group(2)) * int(mm.group(3)) * count
        work += flops  # useful work; time: a wgmma narrower than N = 64 takes the issue time of an n64 one
        total += flops / min(1.0, int(mm.group(2)) / f["wgmma_full_width_n"])
    width = work / total if total else 1.0
    waits = rec.get("waits_per_iteration") or 0
    wait_f = 1.0 if waits == 0 else min(1.0, rec["products_per_tile"] / waits / f["reference_products_per_wait"])
    stages = f["single_stage"] if rec.get("num_stages", 2) <= 1 else 1.0
    threads = 32 * rec["num_warps"]
    regs = -(-max(rec["registers"], 1) // 8) * 8
    ctas = min(m["sm_registers"] // (regs * threads), m["max_warps"] // rec["num_warps"],
               m["sm_shared"] // max(rec["shared_bytes"] + 1024, 1))
    warpgroups = ctas * rec["num_warps"] / 4
    occupancy = 1.0 if warpgroups >= 2 else f["one_warpgroup"]
    spills = f["spills"] if rec.get("spill_bytes", 0) > 0 else 1.0
    eff = m["triton_reference"] * width * wait_f * stages * occupancy * spills
    return dict(efficiency=eff, width=width, waits=wait_f, stages=stages, occupancy=occupancy, spills=spills,
                resident_warpgroups=warpgroups)


def pass_of(kernel: str) -> str:
    """The pass (a key of :data:`PASSES`) a launch (``jvp_backward_dkdv[dk]``, ...) belongs to."""
    from flowmap_kernels.attention.triton.configs import table_key
    base = table_key(kernel)
    for name, kernels in PASSES.items():
        if base in kernels:
            return name
    return family(kernel)


def summaries(records: Iterable[dict]) -> list:
    """Per (pass, dtype, head dim, arch) summary of the Triton launch records.

    ``products``: the sum over the pass's launches of products per key-loop iteration (a pass may have
    several launches: dK/dV and dQ kernels, split launches); ``minimum_products``: docs/math.md section 1;
    ``complete``: every launch of the pass is among the records; ``predicted_ratio_fa2``: the modelled time
    of the pass over FlashAttention-2's forward (forward, jvp_forward) or backward (backward,
    jvp_backward) on the same problem, None where not modelled (:func:`launch_efficiency`): an ESTIMATE.
    Dense problems only (records of other ``variant`` s are left out).
    """
    from flowmap_kernels.attention.triton.configs import table_key
    groups: dict = {}
    for r in records:
        if r.get("source", "triton") != "triton" or "products_per_tile" not in r or \
                r.get("variant", "dense") != "dense":
            continue
        groups.setdefault((pass_of(r["kernel"]), r["dtype"], r["head_dim"], r["arch"]), []).append(r)
    order = list(PASSES)
    out = []
    for (p, dtype, d, arch), recs in sorted(groups.items(), key=lambda kv: (ARCHS.get(kv[0][3], 0), kv[0][1],
                                                                            kv[0][2], order.index(kv[0][0]))):
        present = {table_key(r["kernel"]) for r in recs}
        complete = set(PASSES[p]) <= present
        products = sum(r["products_per_tile"] for r in recs)
        ratio, model = None, {}
        m = MODEL.get(arch)
        heavy = [r for r in recs if r["products_per_tile"]]
        if m is not None and complete and heavy:
            effs = {r["kernel"]: launch_efficiency(r) for r in heavy}
            if all(e is not None for e in effs.values()):
                ours = sum(r["products_per_tile"] / effs[r["kernel"]]["efficiency"] for r in heavy)
                ref = FA2_PASS[p]
                fa2 = FA2_PRODUCTS[ref] / m["fa2"][ref]
                ratio = round(ours / fa2, 3)
                model = {k: round(e["efficiency"], 3) for k, e in effs.items()}
        out.append({"source": "summary", "pass": p, "dtype": dtype, "head_dim": d, "arch": arch,
                    "products": products, "minimum_products": MINIMUM_PRODUCTS[p],
                    "products_by_launch": {r["kernel"]: r["products_per_tile"] for r in recs},
                    "complete": complete, "shipped": all(r.get("shipped", False) for r in recs),
                    "efficiency_by_launch": model, "predicted_ratio_fa2": ratio})
    return out


def format_summary(rows: list) -> str:
    """The per-pass table: products vs the minimum and the predicted ratio to FlashAttention-2."""
    head = f"{'arch':7s} {'dtype':5s} {'D':>4s} {'pass':13s} {'products':>8s} {'minimum':>7s} " \
           f"{'vs FA2 (ESTIMATE)':>17s}  launches: products per tile [modelled efficiency]"
    lines = [head, "-" * len(head)]
    for s in rows:
        ratio = "-" if s["predicted_ratio_fa2"] is None else f"{s['predicted_ratio_fa2']:.2f}x"
        parts = ", ".join(f"{k} {n}" + (f" [{s['efficiency_by_launch'][k]:.2f}]" if k in s["efficiency_by_launch"]
                                         else "") for k, n in s["products_by_launch"].items())
        lines.append(f"{s['arch']:7s} {s['dtype']:5s} {s['head_dim']:>4d} {s['pass']:13s} {s['products']:>8d} "
                     f"{s['minimum_products']:>7d} {ratio:>17s}  {parts}" + ("" if s["complete"] else " (partial)"))
    return "\n".join(lines)


def cuda_records_source(archs, **_) -> list:
    """Records of the CUDA C++ kernels (flowmap_kernels.compile_report.cuda.cuda_records) when present."""
    try:
        mod = importlib.import_module("flowmap_kernels.compile_report.cuda")
    except ImportError:
        return []
    recs = []
    for r in mod.cuda_records(list(archs)):
        r = dict(r)
        r.setdefault("source", "cuda")
        recs.append(r)
    return recs


def triton_records_source(archs, head_dims=DEFAULT_HEAD_DIMS, dtypes=("bf16", "fp16", "fp32"),
                          kernels=TRITON_KERNELS, cache=None, progress=None, workers=1, variants=("dense",),
                          **_) -> list:
    return triton_records(archs, head_dims, dtypes, kernels, cache, progress, workers, variants)


#: Record sources: callables (archs, **filters) -> list of records. Append to add more.
RECORD_SOURCES: list = [triton_records_source, cuda_records_source]


def collect(archs=tuple(ARCHS), sources=None, **filters) -> list:
    """Records from every source for ``archs`` (filters: head_dims, dtypes, kernels, cache, progress)."""
    out = []
    for src in (RECORD_SOURCES if sources is None else sources):
        out.extend(src(tuple(archs), **filters))
    return out


def _mma(r: dict) -> str:
    return r.get("mma") or ("wgmma" if r.get("uses_wgmma") else "-")


def format_table(records: list) -> str:
    head = f"{'kernel':26s} {'arch':7s} {'dtype':5s} {'D':>4s} {'config':19s} {'regs':>4s} {'spill':>6s} " \
           f"{'shared':>7s} {'mma':8s} {'prod':>4s} {'waits':>5s} {'async':8s} shipped"
    lines = [head, "-" * len(head)]
    for r in records:
        waits = r.get("waits_per_iteration")
        variant = r.get("variant", "dense")
        kernel = r["kernel"] if variant == "dense" else f"{r['kernel']} ({variant})"
        lines.append(f"{kernel:26s} {r['arch']:7s} {str(r.get('dtype', '')):5s} {str(r.get('head_dim', '')):>4s} "
                     f"{str(r.get('config', '')):19s} {r['registers']:>4d} {r['spill_bytes']:>6d} "
                     f"{r['shared_bytes']:>7d} {_mma(r):8s} {str(r.get('products_per_tile', '-')):>4s} "
                     f"{'-' if waits is None else str(waits):>5s} {r.get('async_load_kind', '-'):8s} "
                     f"{'yes' if r.get('shipped', True) else 'no'}")
    return "\n".join(lines)


def format_markdown(records: list) -> str:
    """Records as a Markdown table (kernel, arch, dtype, D, config, registers, spill bytes, shared, mma)."""
    lines = ["| kernel | arch | dtype | D | config | registers | spill bytes | shared bytes | mma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r.get('dtype', '')} | {r.get('head_dim', '')} | "
                     f"{r.get('config', '')} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{_mma(r)} |")
    return "\n".join(lines)


def arch_figures(records: Iterable[dict]) -> list:
    """Per compile target: launches, max registers, spilling launches and their largest spill, max shared
    bytes against the family's limit, and the tensor-core kinds emitted (Triton launch records only)."""
    from flowmap_kernels.attention.triton import configs
    out = {}
    for r in records:
        if r.get("source", "triton") != "triton":
            continue
        f = out.setdefault(r["arch"], dict(arch=r["arch"], family=configs.TARGETS[r["arch"]], launches=0,
                                           max_registers=0, spilling=0, max_spill_bytes=0, max_shared_bytes=0,
                                           shared_limit=SHARED_LIMIT[r["arch"]], mma=set(), target=set()))
        f["launches"] += 1
        f["max_registers"] = max(f["max_registers"], r["registers"])
        f["spilling"] += r["spill_bytes"] > 0
        f["max_spill_bytes"] = max(f["max_spill_bytes"], r["spill_bytes"])
        f["max_shared_bytes"] = max(f["max_shared_bytes"], r["shared_bytes"])
        f["mma"].add(_mma(r))
        f["target"].add(r.get("target", r["arch"]))
    rows = [dict(v, mma=sorted(v["mma"]), target=sorted(v["target"])) for k, v in out.items()]
    return sorted(rows, key=lambda v: ARCHS.get(v["arch"], 0))


def format_arch_figures(rows: list) -> str:
    head = f"{'arch':7s} {'family':6s} {'emits':8s} {'launches':>8s} {'max regs':>8s} {'spilling':>8s} " \
           f"{'max spill B':>11s} {'max shared':>10s} {'limit':>7s} mma"
    lines = [head, "-" * len(head)]
    for f in rows:
        lines.append(f"{f['arch']:7s} {f['family']:6s} {','.join(f['target']):8s} {f['launches']:>8d} "
                     f"{f['max_registers']:>8d} {f['spilling']:>8d} {f['max_spill_bytes']:>11d} "
                     f"{f['max_shared_bytes']:>10d} {f['shared_limit']:>7d} {','.join(f['mma'])}")
    return "\n".join(lines)


def count_line(records: list, with_cuda: bool = True) -> str:
    """What the report holds: "N Triton launches + M CUDA kernels" (other sources by name)."""
    counts: dict = {"triton": 0, **({"cuda": 0} if with_cuda else {})}
    for r in records:
        counts[r.get("source", "triton")] = counts.get(r.get("source", "triton"), 0) + 1
    names = {"triton": ("Triton launch", "Triton launches"), "cuda": ("CUDA kernel", "CUDA kernels")}
    return " + ".join(f"{n} {names.get(src, (src + ' record', src + ' records'))[n != 1]}"
                      for src, n in counts.items())


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Usage errors before anything compiles: head dims, workers, output paths."""
    from flowmap_kernels.attention.triton.configs import HEAD_DIM_BUCKETS
    top = HEAD_DIM_BUCKETS[-1]  # the widest tile the kernels have
    bad = [d for d in a.head_dims if not 1 <= d <= top]
    if bad:
        ap.error(f"--head-dims: expected head dims in 1..{top}, got {' '.join(map(str, bad))}")
    if a.workers < 0:
        ap.error(f"--workers: expected a count >= 0 (0: one per CPU), got {a.workers}")
    from ..bench.fpe import check_output_paths
    try:
        check_output_paths({flag: None if path is None else str(path)
                            for flag, path in (("--json", a.json), ("--markdown", a.markdown))})
    except ValueError as e:
        ap.error(str(e))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--worker"]:
        return _worker_main()
    ap = argparse.ArgumentParser(prog="python -m flowmap_kernels.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(DEFAULT_HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPE_NAMES))
    ap.add_argument("--kernels", nargs="+", default=list(TRITON_KERNELS), choices=list(TRITON_KERNELS))
    ap.add_argument("--variants", nargs="+", default=["dense"], choices=list(VARIANTS),
                    help="problems whose launches are compiled: masks, causal, packed sequences, int64 offsets")
    ap.add_argument("--json", type=Path, default=None,
                    help="write the records (then the per-pass summary records, source 'summary') to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="write the records as a Markdown table")
    ap.add_argument("--summary", action="store_true",
                    help="print the per-pass table: products per tile vs the minimum, predicted ratio to FA2")
    ap.add_argument("--triton-only", action="store_true", help="leave out the other record sources")
    ap.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {_default_cache()})")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (default 0: one per CPU)")
    a = ap.parse_args(argv)
    _check_args(ap, a)
    if not a.triton_only:
        from . import cuda
        missing = cuda.unavailable()
        if missing:
            print(f"note: no CUDA kernel records: {missing}", file=sys.stderr)
    recs = collect(a.arch, sources=[triton_records_source] if a.triton_only else None, head_dims=a.head_dims,
                   dtypes=a.dtypes, kernels=a.kernels, cache=None if a.no_cache else _default_cache(),
                   workers=a.workers, variants=a.variants)
    summary = summaries(recs)
    if a.summary:
        print(format_summary(summary))
        print("\npredicted ratio: modelled time of the pass / FlashAttention-2's forward (forward, jvp_forward) or"
              " backward (backward, jvp_backward) on the same problem; an ESTIMATE from the compiled code, no GPU"
              " (docs/triton.md, 'Static performance report')")
    else:
        print(format_table(recs))
        print()
        print(format_arch_figures(arch_figures(recs)))
    bad = [r for r in recs if r["shared_bytes"] > SHARED_LIMIT.get(r["arch"], 1 << 30)]
    spilled = [r for r in recs if r["spill_bytes"] > 0]
    print(f"\n{count_line(recs, with_cuda=not a.triton_only)}; {len(spilled)} spill; {len(bad)} over the "
          f"shared-memory limit")
    if a.json:
        a.json.write_text(json.dumps(recs + summary, indent=1))
    if a.markdown:
        a.markdown.write_text(format_markdown(recs) + "\n")
    return 0

