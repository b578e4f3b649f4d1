"""Cost of one training iteration of every flow-map method, in forward-pass equivalents (FPE).

One iteration = ``loss, _ = method.loss(model, x0, **cfg); loss.backward()`` with the gradients set to
None before it. The optimizer step and the EMA update are EXCLUDED (neither has a matrix product; both
are a few elementwise passes over the parameters). The unit is one forward ``model(x_t, t, t)`` under
torch.no_grad on the same batch.

- FLOP-FPE: FLOPs of the iteration / FLOPs of the forward, counted by ``counting.ExactFlopCounter``
  (torch's FlopCounterMode plus the package's custom-op formulas), products with an identically zero
  operand excluded (``flop_fpe``); ``flop_fpe_executed`` keeps them.
- time-FPE: after warm-up, forward and iteration timed alternately; per iteration, its wall time over
  the mean of the forwards just before and after it; the median over repeats (``time_fpe``). The same
  with process CPU time (``time_fpe_cpu``): on a shared CPU with one thread it does not count the time
  the process waits for a core.
- peak memory: bytes allocated above the start (CUDA: max_memory_allocated; CPU: torch.profiler's
  allocation events), parameters and the batch excluded, gradients included.

Batching: "full" runs every loss term on the full batch (the nominal model's convention); "recommended"
runs a method's own sub-batching where it has a config for it (the ``sc_fraction`` of shortcut and psd; a method
module may declare ``SUBBATCH = {"full": {...}, "recommended": {...}}`` with the cfg of each).
"""
from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import backends as fk_backends
from .counting import count_flops, linear_jvp_is_fused, peak_memory
from .zoo import build_model

__all__ = ["Variant", "variants_for", "measure_method", "run_fpe", "RECORD_FIELDS", "unit_flops", "explain",
           "EXPLAIN", "UNIT_NOMINAL", "check_output_paths"]

RECORD_FIELDS = ["method", "variant", "batching", "backend", "model", "device", "nominal_fpe", "flop_fpe",
                 "flop_fpe_executed", "flop_fpe_explained", "explanation", "time_fpe", "time_fpe_cpu", "peak_mem_bytes",
                 "fwd_peak_mem_bytes", "peak_mem_fpe",
                 "iter_flops", "iter_zero_flops", "fwd_flops", "iter_time_s", "fwd_time_s", "batch",
                 "iter_batch", "calls", "cfg", "note", "error"]


@dataclass
class Variant:
    """One configuration of a method to measure: cfg overrides, the batch multiplier (the loss is called
    on the batch repeated ``repeat`` times), a label and why."""
    variant: str
    batching: str
    cfg: dict = field(default_factory=dict)
    repeat: int = 1
    note: str = ""


def check_output_paths(paths: dict) -> None:
    """Fail before a run, not after it: every ``{flag: path}`` (None skipped) must name a file that can be
    written (its folder exists and is writable; the path is not a folder; two flags not the same file).
    ValueError naming the flag otherwise. Nothing is created or truncated."""
    import os
    seen: dict = {}
    for flag, path in paths.items():
        if path is None:
            continue
        full = os.path.abspath(os.fspath(path))
        if not os.fspath(path) or os.path.isdir(full):
            raise ValueError(f"{flag}: expected a file path, got the folder {path!r}")
        folder = os.path.dirname(full)
        if not os.path.isdir(folder):
            raise ValueError(f"{flag}: folder {folder!r} of {path!r} does not exist")
        if os.path.exists(full) and not os.access(full, os.W_OK) or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{flag}: cannot write {path!r} (permission denied)")
        if full in seen:
            raise ValueError(f"{flag}: same file as {seen[full]} ({path!r})")
        seen[full] = flag


def variants_for(name: str, module) -> list[Variant]:
    """The configurations measured for method ``name`` (its module from flowmap_kernels.methods)."""
    sub = getattr(module, "SUBBATCH", None)
    if isinstance(sub, dict) and "full" in sub and "recommended" in sub:
        return [Variant("default", "full", dict(sub["full"]), note="method's SUBBATCH['full']"),
                Variant("default", "recommended", dict(sub["recommended"]), note="method's SUBBATCH['recommended']")]
    if "sc_fraction" in module.DEFAULTS:  # shortcut, psd: consistency + flow-matching sub-batches
        return [
            Variant("default", "full", {"sc_fraction": 0.5}, repeat=2,
                    note="each term on the full batch B: loss on [x0; x0] (2B) with sc_fraction 0.5, so "
                         "B consistency + B flow-matching samples"),
            Variant("default", "recommended", {}, note="the method's sc_fraction (shortcut 1/8, psd 1/4) of the "
                                                                  "batch B, rest flow matching"),
        ]
    if name == "esd":
        return [
            Variant("default", "full", {}, note="spatial_sg=True: extra no-grad spatial JVP"),
            Variant("spatial_sg=False", "full", {"spatial_sg": False},
                    note="one JVP along (v_hat, 1, 0), backprop through all of it (the nominal model's structure)"),
        ]
    notes = {
        "meanflow": "no sub-batch cfg: ratio_neq only moves pairs onto s = t; the JVP still runs on the full batch",
        "imf": "no sub-batch cfg: the JVP and v_hat forward run on the full batch",
        "tvm": "no sub-batch cfg for the Lagrangian (JVP) term vs the flow-matching term",
        "lsd": "no sub-batch cfg for the Lagrangian (JVP) term vs the flow-matching term",
        "scm": "one term",
        "fm": "one term",
    }
    if name == "scm":  # its learned weight w(s) is a separate small MLP on the time, not a call of the network
        return [Variant("default", "full", {"adaptive_weighting": False},
                        note="one term; the learned time weighting (a 2-layer MLP on s) left out")]
    return [Variant("default", "full", {}, note=notes.get(name, ""))]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> tuple:
    """(wall seconds, process CPU seconds) of one call of fn."""
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved_times(fwd: Callable, step: Callable, device, warmup: int, repeats: int) -> dict:
    """Time forward and iteration alternately: fwd, step, fwd, step, ..., fwd (after warm-up of both).

    Each iteration's ratio is taken against the mean of the forwards just before and after it, and
    the median over repeats is reported, so slow drifts of a shared machine's load cancel. Both wall
    time and process CPU time (meaningful on the CPU with one thread: it excludes time the process
    waits for a core) are reported.
    """
    for _ in range(warmup):
        fwd()
        step()
    f = [_timed(fwd, device)]
    it = []
    for _ in range(max(1, repeats)):
        it.append(_timed(step, device))
        f.append(_timed(fwd, device))
    out = {}
    for k, name in ((0, "wall"), (1, "cpu")):
        ratios = [it[i][k] / max(1e-12, 0.5 * (f[i][k] + f[i + 1][k])) for i in range(len(it))]
        out[name] = (statistics.median(ratios), statistics.median(x[k] for x in f),
                     statistics.median(x[k] for x in it))
    return out


def _forward_fn(model, x0, cond, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.rand(x0.shape[0], generator=g).to(device=x0.device, dtype=x0.dtype)
    eps = torch.randn(x0.shape, generator=g).to(device=x0.device, dtype=x0.dtype)
    tb = t.reshape(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tb) * x0 + tb * eps

    def fwd():
        with torch.no_grad():
            return model(xt, t, t, y=cond)
    return fwd


def _iteration_fn(module, model, x, cond, cfg, seed):
    def step():
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(seed)
        lo, _ = module.loss(model, x, cond=cond, **cfg)
        lo.backward()
        return lo
    return step


def measure_method(name: str, module, variant: Variant, model, x0, cond, *, device, backend: str,
                   model_name: str, warmup: int = 2, repeats: int = 5, seed: int = 0,
                   measure_time: bool = True, measure_memory: bool = True) -> dict:
    """One record: FLOP-FPE, time-FPE and peak memory of one iteration of ``module``'s loss + backward."""
    rec = dict.fromkeys(RECORD_FIELDS)
    rec.update({"method": name, "variant": variant.variant, "batching": variant.batching, "backend": backend,
           "model": model_name, "device": str(device), "nominal_fpe": getattr(module, "NOMINAL_FPE", None),
           "calls": getattr(module, "CALLS", ""), "cfg": dict(variant.cfg), "note": variant.note,
           "batch": int(x0.shape[0]), "iter_batch": int(x0.shape[0]) * variant.repeat, "error": None})
    x = x0 if variant.repeat == 1 else x0.repeat(variant.repeat, *([1] * (x0.dim() - 1)))
    c = cond if cond is None or variant.repeat == 1 else cond.repeat(variant.repeat)
    fwd = _forward_fn(model, x0, cond, seed)
    step = _iteration_fn(module, model, x, c, variant.cfg, seed)
    try:
        f_fwd, f_it = count_flops(fwd), count_flops(step)
        rec.update(fwd_flops=f_fwd.total, iter_flops=f_it.total, iter_zero_flops=f_it.zero,
                   flop_fpe=f_it.useful / f_fwd.useful, flop_fpe_executed=f_it.total / f_fwd.total,
                   fwd_zero_flops=f_fwd.zero, iter_flops_by_op=f_it.by_op, iter_zero_flops_by_op=f_it.zero_by_op,
                   fwd_flops_by_op=f_fwd.by_op)
        if measure_time:
            t = interleaved_times(fwd, step, device, warmup, repeats)
            rec.update(time_fpe=t["wall"][0], fwd_time_s=t["wall"][1], iter_time_s=t["wall"][2],
                       time_fpe_cpu=t["cpu"][0], fwd_cpu_time_s=t["cpu"][1], iter_cpu_time_s=t["cpu"][2])
        if measure_memory:
            m_f, m_i = peak_memory(fwd, device), peak_memory(step, device)
            rec.update(fwd_peak_mem_bytes=m_f, peak_mem_bytes=m_i, peak_mem_fpe=m_i / m_f if m_f else None)
    except Exception as e:  # keep going: one failing method must not hide the others
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=6)
    finally:
        for p in model.parameters():
            p.grad = None
    return rec


def _resolved_backends(model, x0, cond) -> dict:
    """Which backend actually ran each op kind during one forward (attention problems and DiT primitives)."""
    import importlib
    af = importlib.import_module("flowmap_kernels.attention.functional")
    from ..ops import functional as opsf
    seen: dict = {}
    orig_att, orig_ops = af.resolve_backend, opsf.resolve_backend

    def probe(*args, **kw):
        name = orig_att(*args, **kw)
        seen.setdefault("attention", name)
        return name
    af.resolve_backend = probe
    try:
        _forward_fn(model, x0, cond, 0)()
    except Exception:
        pass
    finally:
        af.resolve_backend = orig_att
    for op in ("modulated_layer_norm", "rms_norm", "gelu_tanh", "gated_residual", "linear"):
        try:
            seen[op] = orig_ops(op, x0)
        except Exception as e:
            seen[op] = f"unresolved: {type(e).__name__}"
    return seen


def run_fpe(*, model: str = "dit-s", device="cpu", batch: int = 8, repeats: int = 5, warmup: int = 2,
            backends=("auto", "naive"), methods: Optional[list] = None, seed: int = 0,
            measure_time: bool = True, measure_memory: bool = True, dtype=torch.float32,
            log: Optional[Callable[[str], None]] = None, build: Optional[Callable] = None) -> list:
    """Measure every method (or ``methods``) under each backend; a list of records (see RECORD_FIELDS).

    Every record carries ``meta`` (versions, device, NVML) and the model/backends actually used.
    ``build`` (optional) replaces the zoo: build() -> (model, x0, cond, info dict), called once per backend.
    """
    from ..methods import METHODS
    from .meta import metadata
    names = list(METHODS) if methods is None else list(methods)
    for n in names:
        if n not in METHODS:
            raise ValueError(f"methods: unknown method {n!r}; choose from {sorted(METHODS)}")
    for b in backends:
        if b not in fk_backends.BACKEND_NAMES:
            raise ValueError(f"backend: unknown backend {b!r}; choose from {list(fk_backends.BACKEND_NAMES)}")
    for what, given in (("methods", names), ("backends", list(backends))):
        dup = sorted({n for n in given if given.count(n) > 1})
        if dup:  # measured twice: duplicate records in the JSON / CSV, one row in the table
            raise ValueError(f"{what}: {', '.join(map(repr, dup))} given more than once")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but torch.cuda.is_available() is False")
    meta = metadata(device)
    records = []
    for b in backends:
        if build is None:
            net, x0, cond, minfo = build_model(model, batch=batch, device=device, dtype=dtype, seed=seed)
        else:
            net, x0, cond, minfo = build()
            batch = int(x0.shape[0])
        with fk_backends.use_backend(b):
            fused_linear = linear_jvp_is_fused(device)
            resolved = _resolved_backends(net, x0, cond)
            units = unit_flops(net, x0, cond, seed=seed)
            unit_fpe = {k: v / units["F"] for k, v in units.items() if "/" not in k}
            for n in names:
                for v in variants_for(n, METHODS[n]):
                    rec = measure_method(n, METHODS[n], v, net, x0, cond, device=device, backend=b,
                                         model_name=model, warmup=warmup, repeats=repeats, seed=seed,
                                         measure_time=measure_time, measure_memory=measure_memory)
                    ex = explain(n, v.variant, v.batching, units, batch, v.cfg)
                    if ex is not None and not rec.get("error"):
                        rec.update(flop_fpe_explained=ex[0] / units["F"], explanation=ex[2],
                                   explained_exactly=(ex[0] == rec["iter_flops"] - rec["iter_zero_flops"]
                                                      and ex[1] == rec["iter_flops"]))
                    rec.update(unit_flops=units, unit_fpe=unit_fpe, model_info=minfo, resolved_backends=resolved,
                               linear_jvp_fused=fused_linear,
                               dtype=str(dtype).replace("torch.", ""), repeats=repeats, warmup=warmup,
                               optimizer_step="excluded", ema_update="excluded", meta=meta)
                    records.append(rec)
                    if log:
                        log(_one_line(rec))
    return records


def _one_line(r: dict) -> str:
    if r.get("error"):
        return f"{r['backend']:>6} {r['method']:>9} {r['variant']:>16} {r['batching']:>11}  ERROR {r['error']}"
    t = f"{r['time_fpe']:6.2f}" if r.get("time_fpe") is not None else "   n/a"
    return (f"{r['backend']:>6} {r['method']:>9} {r['variant']:>16} {r['batching']:>11}  "
            f"FLOP-FPE {r['flop_fpe']:6.3f}  time-FPE {t}")


# ---- unit costs and the term-by-term explanation ---------------------------------------------------
#
# Units, each one call of the model on the batch B (nominal cost in brackets):
#   F        forward under torch.no_grad                                               [1]
#   FB       forward + backward of a loss of the output                                [1 + 2 = 3]
#   J:d      torch.func.jvp (forward + JVP) under torch.no_grad, tangent direction d    [2]
#   JB:d     jvp, backward through the primal output only (tangent detached)           [2 + 2 = 4]
#   JBJ:d    jvp, backward through both outputs (reverse-over-forward)                 [2 + 4 = 6]
# Directions d (tangents of (x, s, t)): "x1" = (random, 1, 0), "x" = (random, 0, 0), "s" = (0, 1, 0),
# "t" = (0, 0, 1): a zero tangent makes some products zero-operand products (excluded from flop_fpe).

UNIT_NOMINAL = {"F": 1, "FB": 3, "J": 2, "JB": 4, "JBJ": 6}
_DIRS = {"x1": (1, 1, 0), "x": (1, 0, 0), "s": (0, 1, 0), "t": (0, 0, 1)}

# (method, variant, batching) -> [(multiplier of the batch B, unit)]
EXPLAIN = {
    ("fm", "default", "full"): [(1, "FB")],
    ("meanflow", "default", "full"): [(1, "JB:x1")],
    ("scm", "default", "full"): [(1, "JB:x1")],
    ("imf", "default", "full"): [(1, "F"), (1, "JB:x1")],
    ("tvm", "default", "full"): [(1, "JBJ:t"), (1, "F"), (1, "FB")],
    ("lsd", "default", "full"): [(1, "JBJ:t"), (1, "F"), (1, "FB")],
    ("esd", "default", "full"): [(1, "F"), (1, "J:x"), (1, "JBJ:s"), (1, "FB")],
    ("esd", "spatial_sg=False", "full"): [(1, "F"), (1, "JBJ:x1"), (1, "FB")],
    ("shortcut", "default", "full"): [(2, "F"), (2, "FB")],
    ("shortcut", "default", "recommended"): [("sc", "F"), ("sc", "F"), (1, "FB")],
    ("psd", "default", "full"): [(2, "F"), (2, "FB")],
    ("psd", "default", "recommended"): [("sc", "F"), ("sc", "F"), (1, "FB")],
}


def _unit_inputs(model, x0, cond, seed):
    g = torch.Generator(device="cpu").manual_seed(seed + 7)
    B = x0.shape[0]
    a, b = torch.rand(B, generator=g), torch.rand(B, generator=g)
    s, t = torch.maximum(a, b).to(x0), torch.minimum(a, b).to(x0)
    x = torch.randn(x0.shape, generator=g).to(x0)
    tx = torch.randn(x0.shape, generator=g).to(x0)
    return x, s, t, tx


def unit_flops(model, x0, cond, *, seed: int = 0) -> dict:
    """FLOPs (products with an all-zero operand excluded) of each unit call on the batch x0; also
    '<unit>/executed' with them. Keys: F, FB, J:d, JB:d, JBJ:d for d in x1, x, s, t."""
    x, s, t, tx = _unit_inputs(model, x0, cond, seed)
    f = lambda a, b, c: model(a, b, c, y=cond)  # noqa: E731

    def tangents(d):
        mx, ms, mt = _DIRS[d]
        return (tx * mx, torch.full_like(s, float(ms)), torch.full_like(t, float(mt)))

    def zero_grads():
        for p in model.parameters():
            p.grad = None

    calls = {}

    def c_F():
        with torch.no_grad():
            f(x, t, t)

    def c_FB():
        zero_grads()
        f(x, t, t).square().mean().backward()
    calls["F"], calls["FB"] = c_F, c_FB
    for d in _DIRS:
        def c_J(d=d):
            with torch.no_grad():
                torch.func.jvp(f, (x, s, t), tangents(d))

        def c_JB(d=d):
            zero_grads()
            V, dV = torch.func.jvp(f, (x, s, t), tangents(d))
            (V - dV.detach()).square().mean().backward()

        def c_JBJ(d=d):
            zero_grads()
            V, dV = torch.func.jvp(f, (x, s, t), tangents(d))
            (V + dV).square().mean().backward()
        calls[f"J:{d}"], calls[f"JB:{d}"], calls[f"JBJ:{d}"] = c_J, c_JB, c_JBJ
    out = {}
    for k, fn in calls.items():
        c = count_flops(fn)
        out[k], out[k + "/executed"] = c.useful, c.total
    zero_grads()
    return out


def explain(method: str, variant: str, batching: str, units: dict, batch: int, cfg: Optional[dict] = None):
    """(expected useful FLOPs, expected executed FLOPs, formula) of an iteration from the unit costs,
    or None when the configuration has no entry in EXPLAIN."""
    terms = EXPLAIN.get((method, variant, batching))
    if terms is None:
        return None
    useful = executed = 0
    parts = []
    for mult, unit in terms:
        if mult == "sc":  # the consistency sub-batch of shortcut / psd: round(B * sc_fraction) samples
            from ..methods import get_method
            frac = (cfg or {}).get("sc_fraction", get_method(method).DEFAULTS["sc_fraction"])
            n = int(round(batch * frac))
            num, den, label = n, batch, f"{n}/{batch}"
        else:
            num, den, label = mult, 1, ("" if mult == 1 else f"{mult}")
        # unit FLOPs are linear in the batch: scale exactly with integers
        useful_part, exec_part = units[unit] * num, units[unit + "/executed"] * num
        if useful_part % den or exec_part % den:
            raise ValueError(f"batch: {batch} does not split evenly for {method}'s sub-batch")
        useful += useful_part // den
        executed += exec_part // den
        parts.append(f"{label}{'*' if label else ''}{unit}")
    return useful, executed, " + ".join(parts)
