"""The one benchmark harness: device choice, timing, metadata, tables and CSV/JSON output.

Every script under benchmarks/ and ``python -m flowmap_kernels.bench`` use it:

    dev = pick_device(args.device)                 # "auto": CUDA when present, else CPU
    out = check_output(args.out, ".json")          # fail before the run, not after it
    stats = time_call(fn, dev, warmup=1, repeats=5)  # {"ms_median", "ms_min", "repeats"}
    print_table(rows, ["N", "backend", "ms"])
    write_results(rows, out, meta=metadata(dev))   # <out>.json {"meta", "rows"} and <out>.csv

Command-line checks, before any work (usage errors: ``parser.error``, exit status 2, naming the flag):

    require_ints(parser, args, "batch", "sizes")   # each an integer >= 1 (a list: every entry)
    require_divides(parser, args, "heads", "hidden")
    require_multiple(parser, args, "input_size", 2, "the patch size")
    require_backends(parser, "--backends", args.backends)   # names from flowmap_kernels.backends.BACKEND_NAMES
    require_backends(parser, "--backends", args.backends, ATTENTION, **problem)  # ... that run it here
    out = require_output(parser, args.out, ".json")

Times on CUDA come from CUDA events around each call (after synchronising), on the CPU from
``time.perf_counter``; the median of ``repeats`` calls after ``warmup`` calls.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from .meta import metadata

__all__ = ["device_error", "pick_device", "check_output", "time_call", "print_table", "write_results", "metadata",
           "require_ints", "require_divides", "require_multiple", "require_names", "require_backends",
           "require_output"]


def device_error(name: str) -> Optional[str]:
    """Why ``name`` is not a device the benchmarks run on (cpu, cuda, cuda:N with N a present GPU), or None."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        return f"expected cpu, cuda or cuda:N, got {name!r}"
    if m.group(1) == "cuda":
        if not torch.cuda.is_available():
            return f"{name!r} requested but CUDA is not available (torch.cuda.is_available() is False)"
        if m.group(2) is not None and int(m.group(2)) >= torch.cuda.device_count():
            return f"{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def pick_device(name: Optional[str] = "auto") -> torch.device:
    """``"auto"`` (or None): cuda when available, else cpu; otherwise the named device (checked:
    :func:`device_error`, ValueError)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = device_error(name)
    if problem:
        raise ValueError(f"device: {problem}")
    return torch.device(name)


def check_output(path, suffix: str = "") -> Path:
    """``path`` as a Path whose folder exists (created) and is writable; ValueError naming it otherwise.

    ``suffix`` (e.g. ".json") is checked too when given: a directory of that name is an error.
    """
    p = Path(path)
    target = p.with_suffix(suffix) if suffix else p
    if target.is_dir():
        raise ValueError(f"out: {target} is a directory; expected a file path")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out: cannot create the folder {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ValueError(f"out: the folder {parent} is not writable")
    return p


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def require_ints(parser: argparse.ArgumentParser, args: argparse.Namespace, *dests: str, minimum: int = 1) -> None:
    """Usage error for the first flag (by ``args`` attribute: "input_size" is --input-size) whose value is below
    ``minimum``; a list (``nargs``) is checked entry by entry, None (a flag not given) is skipped."""
    for dest in dests:
        value = getattr(args, dest)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if any(v < minimum for v in value):
                parser.error(f"{_flag(dest)}: expected integers >= {minimum}, got {' '.join(map(str, value))}")
        elif value < minimum:
            parser.error(f"{_flag(dest)}: expected an integer >= {minimum}, got {value}")


def require_divides(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, of: str) -> None:
    """Usage error unless flag ``dest`` divides flag ``of`` (the heads the hidden size)."""
    if getattr(args, of) % getattr(args, dest):
        parser.error(f"{_flag(dest)}: {getattr(args, dest)} does not divide {_flag(of)} {getattr(args, of)}")


def require_multiple(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, factor: int,
                     what: str) -> None:
    """Usage error unless flag ``dest`` is a multiple of ``factor`` (``what``: "the patch size")."""
    if getattr(args, dest) % factor:
        parser.error(f"{_flag(dest)}: expected a multiple of {what} {factor}, got {getattr(args, dest)}")


def require_names(parser: argparse.ArgumentParser, flag: str, names: Sequence[str], known: Iterable[str],
                  what: str, given: Optional[str] = None) -> list:
    """``names`` when each is one of ``known`` and none is given twice (it would be measured twice and written
    twice); usage error otherwise (``given``: the flag's text, quoted in the message about a repeat)."""
    known, names = list(known), list(names)
    for n in names:
        if n not in known:
            parser.error(f"{flag}: unknown {what} {n!r}; choose from {', '.join(known)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        parser.error(f"{flag}: {what} {', '.join(map(repr, dup))} given more than once"
                     + (f" in {given!r}" if given is not None else ""))
    return names


def require_backends(parser: argparse.ArgumentParser, flag: str, names: Sequence[str], registry=None,
                     **problem) -> list:
    """``names`` when each is a backend name (flowmap_kernels.backends.BACKEND_NAMES, none twice) and, given an
    op's ``registry`` (an OpRegistry) and a ``problem`` (device, dtype, ...), each can run that problem here;
    usage error otherwise (an unknown name, or why the backend cannot run it)."""
    from ..backends import BACKEND_NAMES
    names = require_names(parser, flag, names, BACKEND_NAMES, "backend")
    if registry is not None:
        for name in names:
            try:
                registry.resolve(name, **problem)
            except RuntimeError as e:  # BackendUnavailableError
                parser.error(f"{flag}: {name!r} cannot run here: {e}")
    return names


def require_output(parser: argparse.ArgumentParser, path, suffix: str = "", flag: str = "--out") -> Path:
    """:func:`check_output` of a flag's path, a usage error naming ``flag`` when it fails."""
    try:
        return check_output(path, suffix)
    except ValueError as e:
        parser.error(f"{flag}: {str(e).split(': ', 1)[-1]}")


def time_call(fn: Callable[[], object], device, warmup: int = 1, repeats: int = 5) -> dict:
    """Median and minimum milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "repeats": len(times)}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def print_table(rows: Sequence[dict], columns: Optional[Iterable[str]] = None) -> str:
    """Print ``rows`` as a Markdown table (the given columns, else the first row's keys); returns the text."""
    if not rows:
        print("(no rows)")
        return ""
    cols = list(columns) if columns is not None else list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(rows: Sequence[dict], out, meta: Optional[dict] = None,
                  columns: Optional[Iterable[str]] = None) -> tuple:
    """Write ``<out>.json`` ({"meta", "rows"}) and ``<out>.csv`` (scalar columns); returns both paths."""
    out = check_output(out)
    jpath, cpath = out.with_suffix(".json"), out.with_suffix(".csv")
    jpath.write_text(json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=1, default=str))
    cols = list(columns) if columns is not None else [
        k for k in (rows[0] if rows else {}) if not isinstance(rows[0][k], (dict, list, tuple))]
    with open(cpath, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {cpath} and {jpath}")
    return cpath, jpath
