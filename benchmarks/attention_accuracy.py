"""Largest relative error of each attention path against the float64 reference, per backend and dtype.

Runs the test suite's cases (tests/attention/cases.py) through torch.func.jvp, forward_ad and the explicit
attention_jvp, then the backward of a loss on (O, tO) to all six inputs, and prints the worst
norm(a - b) / norm(b) per (backend, dtype) for outputs, tangents and gradients; then the gradient of a
learned float mask (tests/attention/test_mask_grad.py's cases) through O and through (O, tO).

    python -m benchmarks.attention_accuracy [--backends torch] [--out bench_out/attention_accuracy]
    python -m benchmarks.attention_accuracy --backends triton   # Triton kernels in the CPU interpreter

It reuses the test suite's cases and references (tests/, next to benchmarks/); run as a script
(``python benchmarks/attention_accuracy.py``), it puts the repository root on sys.path itself.

With "triton" on a machine without a GPU the kernels run in Triton's interpreter, whose bfloat16 arithmetic
the package corrects (flowmap_kernels/attention/triton/interpreter.py).
"""
from __future__ import annotations

import argparse
import os
import sys

if not __package__:  # run as a script: tests/ is importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

INTERPRET = "triton" in sys.argv and not os.path.exists("/dev/nvidia0")
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402

import flowmap_kernels as fk  # noqa: E402
from flowmap_kernels.attention.registry import ATTENTION  # noqa: E402
from flowmap_kernels.bench.harness import (metadata, print_table, require_backends, require_output,  # noqa: E402
                                           write_results)
from tests.attention import test_mask_grad as mask_cases  # noqa: E402
from tests.attention.cases import Case  # noqa: E402
from tests.attention.test_functional import CASES, PATHS  # noqa: E402
from tests.numerics import TOLERANCE, rel_err  # noqa: E402
from tests.reference import loss_on_outputs, ref_grads  # noqa: E402

NAMES = ("q", "k", "v", "tq", "tk", "tv")


def worst_errors(backend: str, dtype: torch.dtype, cases: list[Case]) -> dict:
    worst = {"o": 0.0, "to": 0.0, "grads": 0.0}
    for case in cases:
        for path in PATHS.values():
            t = case.make(dtype, requires_grad=True)
            xs = [t[n] for n in NAMES]
            (ro, rto), rgrads = ref_grads(*xs, t["wo"], t["wt"], **case.kwargs)
            with fk.use_backend(backend):
                o, to = path(case, t)
            grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), xs)
            worst["o"] = max(worst["o"], rel_err(o, ro))
            worst["to"] = max(worst["to"], rel_err(to, rto))
            worst["grads"] = max([worst["grads"]] + [rel_err(g, rg) for g, rg in zip(grads, rgrads)])
    return worst


def worst_mask_errors(backend: str, dtype: torch.dtype) -> dict:
    """Worst relative error of the gradient of a learned float mask: through O and through (O, tO)."""
    worst = {"dmask_o": 0.0, "dmask_o_to": 0.0}
    for case in mask_cases.CASES:
        (q, k, v, tq, tk, tv, mask), (wo, wt), gqa = mask_cases._inputs(case, dtype)
        want_o = mask_cases._ref_primal_grads(q, k, v, mask, wo, gqa)[3]
        want_j = mask_cases._ref_jvp_grads(q, k, v, tq, tk, tv, mask, wo, wt, gqa)[6]
        with fk.use_backend(backend):
            m = mask.clone().requires_grad_(True)
            o = fk.attention(q, k, v, attn_mask=m, enable_gqa=gqa)
            (g_o,) = torch.autograd.grad((o.double() * wo).sum(), m)
            o, to = fk.attention_jvp(q, k, v, tq, tk, tv, attn_mask=m, enable_gqa=gqa)
            (g_j,) = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), m)
        worst["dmask_o"] = max(worst["dmask_o"], rel_err(g_o, want_o))
        worst["dmask_o_to"] = max(worst["dmask_o_to"], rel_err(g_j, want_j))
    return worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["torch"])
    ap.add_argument("--out", default="bench_out/attention_accuracy", help="writes <out>.csv and <out>.json")
    args = ap.parse_args(argv)
    # usage errors before the run: known backend names that run attention on these CPU cases (triton: the
    # interpreter, set up above when "triton" is on the command line)
    require_backends(ap, "--backends", args.backends, ATTENTION, device=torch.device("cpu"), dtype=torch.float32,
                     head_dim=64, v_head_dim=64)
    out = require_output(ap, args.out)
    rows = []
    for backend in args.backends:
        dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
        if backend == "triton":
            dtypes = dtypes[1:]
        for dtype in dtypes:
            w = {**worst_errors(backend, dtype, CASES), **worst_mask_errors(backend, dtype)}
            rows.append({"backend": backend, "dtype": str(dtype).replace("torch.", ""), **w,
                         "tolerance": TOLERANCE[dtype]})
    print_table(rows, ["backend", "dtype", "o", "to", "grads", "dmask_o", "dmask_o_to", "tolerance"])
    write_results(rows, out, meta=metadata("cpu"))


if __name__ == "__main__":
    main()
