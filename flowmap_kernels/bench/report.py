"""Output of the FPE benchmark: a text table beside the nominal FPE, JSON, CSV and a bar chart."""
from __future__ import annotations

import csv
import json
import math
from typing import Optional

__all__ = ["format_table", "write_json", "write_csv", "write_plot", "fmt_bytes"]


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _key(r):
    return (r["method"], r["variant"], r["batching"])


def _f(v, spec="6.2f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(records: list) -> str:
    """One row per (method, variant, batching); per backend: FLOP-FPE, time-FPE, peak memory."""
    backends = list(dict.fromkeys(r["backend"] for r in records))
    rows, order = {}, []
    for r in records:
        k = _key(r)
        if k not in rows:
            rows[k] = {}
            order.append(k)
        rows[k][r["backend"]] = r
    head = f"{'method':<9} {'variant':<16} {'batching':<11} {'nominal':>7}"
    for b in backends:
        head += f" | {b + ' FLOP':>10} {'time':>6} {'cpu-t':>6} {'peak mem':>10}"
    lines = [head, "-" * len(head)]
    for k in order:
        any_r = next(iter(rows[k].values()))
        line = f"{k[0]:<9} {k[1]:<16} {k[2]:<11} {_f(any_r.get('nominal_fpe'), '7.0f')}"
        for b in backends:
            r = rows[k].get(b)
            if r is None or r.get("error"):
                line += f" | {'error' if r else '-':>10} {'':>6} {'':>6} {'':>10}"
                continue
            line += (f" | {_f(r.get('flop_fpe'), '10.3f')} {_f(r.get('time_fpe'), '6.2f')} "
                     f"{_f(r.get('time_fpe_cpu'), '6.2f')} "
                     f"{fmt_bytes(r.get('peak_mem_bytes')):>10}")
        lines.append(line)
    errs = [r for r in records if r.get("error")]
    for r in errs:
        lines.append(f"error: {r['backend']} {r['method']} {r['variant']} {r['batching']}: {r['error']}")
    if records:
        m = records[0]
        lines.append(f"model {m['model']} ({m.get('model_info', {}).get('model_impl', '?')}), batch {m['batch']}, "
                     f"device {m['device']}, torch {m['meta']['torch']}, triton {m['meta']['triton']}; "
                     f"FLOP = FLOP-FPE (products with an all-zero operand excluded), time = wall-time FPE, cpu-t = "
                     f"process-CPU-time FPE; optimizer step and EMA excluded")
    return "\n".join(lines)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def write_json(records: list, path: str) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(records), f, indent=1)


def write_csv(records: list, path: str, fields: Optional[list] = None) -> None:
    """Flat CSV: the scalar fields of each record plus a few metadata columns (dicts as JSON)."""
    from .fpe import RECORD_FIELDS
    fields = list(fields or RECORD_FIELDS) + ["model_impl", "torch", "triton", "gpu_name", "linear_jvp_fused"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in records:
            row = {k: r.get(k) for k in fields}
            row["cfg"] = json.dumps(r.get("cfg", {}), default=str)
            row["model_impl"] = r.get("model_info", {}).get("model_impl")
            row["torch"], row["triton"] = r["meta"].get("torch"), r["meta"].get("triton")
            row["gpu_name"] = r["meta"].get("gpu_name")
            w.writerow(row)


def write_plot(records: list, path: str) -> None:
    """PNG: left, nominal vs FLOP-FPE vs time-FPE per backend; right, peak memory per backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.get("error")]
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    keys = list(dict.fromkeys(_key(r) for r in ok))
    by = {(_key(r), r["backend"]): r for r in ok}
    labels = [k[0] + ("" if k[1] == "default" else f"\n{k[1]}") + ("" if k[2] == "full" else f"\n({k[2]})")
              for k in keys]
    series = [("nominal", lambda k: by.get((k, backends[0]), {}).get("nominal_fpe"))]
    series += [(f"FLOP-FPE {backends[0]}", lambda k: by.get((k, backends[0]), {}).get("flop_fpe"))]
    for b in backends:
        series.append((f"time-FPE {b}", lambda k, b=b: by.get((k, b), {}).get("time_fpe")))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(keys) + 4), 4.8),
                                  gridspec_kw={"width_ratios": [3, 2]})
    w = 0.8 / len(series)
    for i, (name, get) in enumerate(series):
        vals = [get(k) or 0.0 for k in keys]
        ax.bar([j + i * w for j in range(len(keys))], vals, w, label=name)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], labels, fontsize=7)
    ax.set_ylabel("cost per iteration / one forward (FPE)")
    ax.axhline(3.0, color="gray", lw=0.5, ls="--")
    ax.legend(fontsize=7)
    w2 = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        vals = [(by.get((k, b), {}).get("peak_mem_bytes") or 0) / 2 ** 20 for k in keys]
        ax2.bar([j + i * w2 for j in range(len(keys))], vals, w2, label=f"peak mem {b}")
    ax2.set_xticks([j + 0.4 - w2 / 2 for j in range(len(keys))], labels, fontsize=7)
    ax2.set_ylabel("peak memory of one iteration (MiB)")
    ax2.legend(fontsize=7)
    m = ok[0] if ok else records[0]
    fig.suptitle(f"FPE per method: model {m['model']}, batch {m['batch']}, device {m['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_tables(records: list) -> str:
    """Markdown: the per-method table (both backends side by side) and the unit-cost table."""
    backends = list(dict.fromkeys(r["backend"] for r in records))
    keys = list(dict.fromkeys(_key(r) for r in records))
    by = {(_key(r), r["backend"]): r for r in records}
    head = "| method | variant | batching | nominal | explained as |"
    sep = "| --- | --- | --- | ---: | --- |"
    for b in backends:
        head += f" FLOP-FPE {b} | FLOP-FPE executed {b} | time-FPE {b} (wall / CPU) | peak mem {b} |"
        sep += " ---: | ---: | ---: | ---: |"
    lines = [head, sep]
    for k in keys:
        r0 = next(by[(k, b)] for b in backends if (k, b) in by)
        line = f"| {k[0]} | {k[1]} | {k[2]} | {_f(r0.get('nominal_fpe'), '.0f')} | {r0.get('explanation') or ''} |"
        for b in backends:
            r = by.get((k, b))
            if r is None or r.get("error"):
                line += " error | | | |"
                continue
            line += (f" {_f(r.get('flop_fpe'), '.3f')} | {_f(r.get('flop_fpe_executed'), '.3f')} | "
                     f"{_f(r.get('time_fpe'), '.2f')} / {_f(r.get('time_fpe_cpu'), '.2f')} | "
                     f"{fmt_bytes(r.get('peak_mem_bytes'))} |")
        lines.append(line)
    lines.append("")
    units = [u for u in records[0].get("unit_fpe", {})]
    if units:
        lines.append("| unit | nominal | " + " | ".join(f"{b} FLOP-FPE | {b} executed" for b in backends) + " |")
        lines.append("| --- | ---: |" + " ---: | ---: |" * len(backends))
        from .fpe import UNIT_NOMINAL
        first = {b: next(r for r in records if r["backend"] == b) for b in backends}
        for u in units:
            nom = UNIT_NOMINAL.get(u.split(":")[0])
            row = f"| {u} | {nom} |"
            for b in backends:
                uf = first[b]["unit_flops"]
                row += f" {uf[u] / uf['F']:.3f} | {uf[u + '/executed'] / uf['F/executed']:.3f} |"
            lines.append(row)
    return "\n".join(lines)
