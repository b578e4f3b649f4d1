"""``python -m flowmap_kernels.bench fpe [options]``: see ``flowmap_kernels.bench.fpe``."""
from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    """The command line; ``fpe``'s own parser is its default ``parser`` (its usage errors name it)."""
    from .zoo import model_names
    p = argparse.ArgumentParser(prog="python -m flowmap_kernels.bench",
                                description="Benchmarks of flowmap_kernels.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fpe", help="cost of one training iteration per method in forward-pass equivalents",
                       description="FLOP-FPE, time-FPE and peak memory of one training iteration (loss + "
                                   "backward; optimizer step and EMA update excluded) of every method, with "
                                   "the package's backends ('auto') and the plain PyTorch ones ('naive').")
    f.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    f.add_argument("--model", default="dit-s", choices=model_names(), help="zoo model (default dit-s)")
    f.add_argument("--batch", type=int, default=8, help="batch size B (default 8)")
    f.add_argument("--repeats", type=int, default=5, help="timed repetitions, median taken (default 5)")
    f.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    f.add_argument("--backends", default="auto,naive", help="comma-separated backends (default auto,naive)")
    f.add_argument("--methods", default=None, help="comma-separated subset of methods (default all)")
    f.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    f.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU (default 1: stable timings on a shared machine; 0 = "
                        "torch's default)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-time", action="store_true", help="FLOPs (and memory) only")
    f.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    f.add_argument("--json", default=None, help="write the records as JSON to this path")
    f.add_argument("--csv", default=None, help="write a flat CSV to this path")
    f.add_argument("--plot", default=None, help="write a PNG bar chart to this path")
    f.add_argument("--markdown", default=None, help="write markdown tables (methods, unit costs) to this path")
    f.add_argument("--quiet", action="store_true", help="no per-record progress lines (nor the profiler's)")
    f.set_defaults(parser=f)
    return p


def _names(parser: argparse.ArgumentParser, flag: str, value: str, known, what: str) -> list:
    """The comma-separated names of ``value`` (blank entries skipped), each in ``known``, none twice (a
    repeated name would measure it twice and write duplicate JSON / CSV records); usage error otherwise."""
    from .harness import require_names
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        parser.error(f"{flag}: expected comma-separated {what} names, got {value!r}")
    return require_names(parser, flag, names, known, what, given=value)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit status 2) before the run: device, batch, repeats, warm-up runs, backends, methods,
    threads. ``args.backends`` / ``args.methods`` become the checked name lists."""
    from .harness import device_error, require_ints
    from ..backends import BACKEND_NAMES
    from ..methods import METHODS
    problem = device_error(args.device)
    if problem:
        parser.error(f"--device: {problem}")
    require_ints(parser, args, "batch", "repeats")
    require_ints(parser, args, "warmup", minimum=0)
    args.backends = _names(parser, "--backends", args.backends, list(BACKEND_NAMES), "backend")
    if args.methods is not None:
        args.methods = _names(parser, "--methods", args.methods, sorted(METHODS), "method")
    if args.threads < 0:
        parser.error(f"--threads: expected an integer >= 0 (0: torch's default), got {args.threads}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args.parser, args)
    import torch
    from .fpe import check_output_paths, run_fpe
    from .report import format_table, markdown_tables, write_csv, write_json, write_plot
    try:  # before the run (minutes), not after it
        check_output_paths({"--json": args.json, "--csv": args.csv, "--plot": args.plot, "--markdown": args.markdown})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.quiet:  # the profiler behind the CPU memory pass logs every start and stop (libkineto) otherwise
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    try:
        records = run_fpe(model=args.model, device=args.device, batch=args.batch, repeats=args.repeats,
                          warmup=args.warmup, backends=args.backends, methods=args.methods, seed=args.seed,
                          measure_time=not args.no_time, measure_memory=not args.no_memory,
                          dtype=getattr(torch, args.dtype),
                          log=None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(records))
    if args.json:
        write_json(records, args.json)
    if args.csv:
        write_csv(records, args.csv)
    if args.plot:
        write_plot(records, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown_tables(records) + "\n")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
