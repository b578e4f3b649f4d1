"""One-shot GPU check of the attention kernels: correctness on CUDA, then the targets' timings, one JSON.

    python benchmarks/gpu_check.py [--out results/gpu_check.json] [--quick]

1. Correctness: the Triton kernels with the shipped (non-interpreter) launch configurations on CUDA,
   against float64 math attention (O, tO by torch.func.jvp; the six gradients of a loss on (O, tO) by
   autograd): awkward lengths, odd head dims, Lq != Lk, causal, bool and float masks (fully masked rows),
   GQA, bf16 / fp16 / fp32, and logits up to |S| ~ 100.
2. Timings (bf16, D 64 and 128, N 4096 and 16384, 32k tokens per batch): forward+JVP against SDPA's flash
   forward, the backward through the JVP against SDPA's flash backward (benchmarks/bench_attention_gpu.py),
   with the two ratios the targets are stated in (forward+JVP <= 1.6x the flash forward, backward
   through the JVP <= 3.5x the flash backward).

Without a CUDA GPU it says so and exits 0, writing nothing. It never fabricates a number.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

# (name, B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask kind, logit scale)
CASES = [
    ("L1", 1, 2, 2, 1, 1, 64, 64, False, None, 1.0),
    ("L77-D72", 2, 3, 3, 77, 77, 72, 72, False, None, 1.0),
    ("Lq200-Lk300", 1, 4, 4, 200, 300, 64, 64, False, None, 1.0),
    ("causal-D128", 2, 4, 4, 333, 333, 128, 128, True, None, 1.0),
    ("bool-mask", 2, 4, 4, 129, 257, 64, 64, False, "bool", 1.0),
    ("float-mask-finfo-min", 2, 4, 4, 129, 257, 64, 64, False, "float", 1.0),
    ("gqa-D96-Dv64", 1, 8, 2, 190, 190, 96, 64, True, None, 1.0),
    ("D256", 1, 2, 2, 100, 100, 256, 256, False, None, 1.0),
    ("logits-100", 1, 4, 4, 256, 256, 64, 64, False, None, 100.0),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 5e-2, "fp16": 2e-2, "fp32": 1e-4}  # relative norm error, as the test suite


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


def _reference(q, k, v, mask, causal, gqa):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def correctness(dtypes) -> list:
    """One record per (case, dtype): relative errors of O, tO and the six gradients against float64, the
    gradients by both backward modes (one pass with atomics; deterministic)."""
    import flowmap_kernels as fk
    rows = []
    dev = "cuda"
    for name, B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask_kind, amp in CASES:
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float64, generator=g)  # noqa: E731
        q64, k64, v64 = rnd(B, Hq, Lq, D) * amp, rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, Dv)
        t64 = [rnd(*x.shape) for x in (q64, k64, v64)]
        do64, dto64 = rnd(B, Hq, Lq, Dv), rnd(B, Hq, Lq, Dv)
        mask = None
        if mask_kind == "bool":
            mask = torch.rand(B, 1, Lq, Lk, device=dev, generator=g) > 0.3
            mask[:, :, :3] = False  # fully masked rows give zeros
        for dt_name in dtypes:
            dt = DTYPES[dt_name]
            if dt == torch.float32 and max(D, Dv) > 64:
                continue  # float32 at these head dims runs on the blockwise backend, not Triton
            m = mask
            if mask_kind == "float":
                m = torch.zeros(B, 1, Lq, Lk, device=dev, dtype=dt)
                m[:, :, :, Lk // 2:] = torch.finfo(dt).min  # the Hugging Face padding idiom
                m[:, :, :2] = torch.finfo(dt).min            # fully masked by finite values: mean of V
            xs = [x.to(dt).requires_grad_() for x in (q64, k64, v64, *t64)]
            with fk.use_backend("triton"):
                o, to = fk.attention_jvp(*xs, attn_mask=m, is_causal=causal, enable_gqa=Hq != Hkv)
            grads = torch.autograd.grad((o, to), xs, (do64.to(dt), dto64.to(dt)), retain_graph=True)
            torch.use_deterministic_algorithms(True)  # the two-pass backward (dQ without atomics)
            try:
                det_grads = torch.autograd.grad((o, to), xs, (do64.to(dt), dto64.to(dt)))
            finally:
                torch.use_deterministic_algorithms(False)
            ref_in = [x.detach().double().requires_grad_() for x in xs]
            m64 = m if m is None or m.dtype == torch.bool else m.double()
            ro, rto = torch.func.jvp(lambda a, b, c: _reference(a, b, c, m64, causal, Hq != Hkv),
                                     tuple(ref_in[:3]), tuple(ref_in[3:]))
            rgrads = torch.autograd.grad((ro, rto), ref_in, (do64, dto64))
            errs = {"O": _rel(o, ro), "tO": _rel(to, rto)}
            names = ("q", "k", "v", "tq", "tk", "tv")
            errs.update({f"d{n}": _rel(a, b) for n, a, b in zip(names, grads, rgrads)})
            errs.update({f"d{n} (deterministic)": _rel(a, b) for n, a, b in zip(names, det_grads, rgrads)})
            worst = max(errs.values())
            ok = math.isfinite(worst) and worst < TOLERANCE[dt_name]
            rows.append(dict(case=name, dtype=dt_name, worst=worst, ok=ok, **errs))
            print(f"{name:22s} {dt_name:5s} worst {worst:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return rows


#: Launch configs timed beside the shipped one (32x128/w8/s2: one launch, 15 products, m64n32 / m64n64, dQ and dtQ
#: added by TMA reductions, spill-free) for the backward through the JVP (impl "triton[<config>]") at D = 64: the
#: two launches of 18 products it replaced (32x64/w4/s2/split2, 4 warps on 64 keys, spill-free; what masked
#: problems run) and the 16-query-column launch (m64n16, 15 products, no spill), which the static report ranks
#: below it: an ESTIMATE only a GPU can settle (docs/triton.md).
ALTERNATIVES = {64: ("32x64/w4/s2/split2", "16x64/w4/s2")}


def timings(quick: bool) -> list:
    import bench_attention_gpu as bag  # a sibling script: its folder is on sys.path when run as a script
    rows = []
    for d in (64, 128):
        for n in ((4096,) if quick else (4096, 16384)):
            rows += bag.run_case(n, d, "bf16", 16, 32768, False, 0.5,
                                 jvp_backward_configs=ALTERNATIVES.get(d, ()))
    return rows


def ratios(rows) -> list:
    """forward+JVP / flash forward and backward-through-JVP / flash backward per (N, D)."""
    out = []
    keys = sorted({(r["n"], r["d"]) for r in rows})
    for n, d in keys:
        ms = {(r["impl"], r["pass_"]): r["ms"] for r in rows if r["n"] == n and r["d"] == d}
        fwd, bwd = ms.get(("sdpa_flash", "forward")), ms.get(("sdpa_flash", "backward"))
        jf, jb = ms.get(("triton", "jvp_forward")), ms.get(("triton", "jvp_backward"))
        alt = {impl[len("triton["):-1]: t / bwd for (impl, kind), t in ms.items()
               if impl.startswith("triton[") and kind == "jvp_backward" and t and bwd}
        out.append(dict(n=n, d=d, jvp_forward_over_flash_forward=jf / fwd if jf and fwd else None,
                        jvp_backward_over_flash_backward=jb / bwd if jb and bwd else None,
                        jvp_backward_alternatives_over_flash_backward=alt,
                        target_forward=1.6, target_backward=3.5))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    ap.add_argument("--quick", action="store_true", help="one length per head dim (N = 4096)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU available: gpu_check needs one; no numbers were produced.")
        return 0
    t0 = time.time()
    from flowmap_kernels.bench.harness import metadata, require_output
    out = require_output(ap, a.out)
    report = dict(meta=metadata("cuda"))
    report["correctness"] = correctness(a.dtypes)
    report["timings"] = timings(a.quick)
    report["ratios"] = ratios(report["timings"])
    report["seconds"] = time.time() - t0
    for r in report["ratios"]:
        print(f"N={r['n']:6d} D={r['d']:3d} forward+JVP / flash forward {r['jvp_forward_over_flash_forward']}"
              f"  backward through JVP / flash backward {r['jvp_backward_over_flash_backward']}")
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return 0 if all(r["ok"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
