"""Config resolution of the training loop: parsed flags -> a frozen ``TrainConfig`` (the flags are not modified).

Resolution order for the 2D presets: a method's DEFAULTS, then PRESETS_2D (2D data, unless --no-preset),
then --cfg; loop flags given as None (--grad-clip, --time-freq) take the preset's value, else LOOP_DEFAULTS.
Every check here runs before any work (no folder created, no process group joined): a bad flag is a
ValueError whose message starts with the flag's name (the CLI prints ``error: ...`` and exits with 2).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..data import get_dataset
from ..methods import (METHODS, get_method, guidance_input_dim, guided_target_settings, uses_aux_velocity,
                       uses_null_class)
from ..methods._common import REDUCTIONS, TIME_DISTS, VELOCITIES
from ..methods.scm import PARAMS as SCM_PARAMS

__all__ = ["TrainConfig", "resolve_config", "PRESETS_2D", "LOOP_DEFAULTS", "MODEL_FLAGS", "model_kind",
           "compare_with_checkpoint"]

# Settings for 2D toy data, applied on top of each method's DEFAULTS (paper values, meant for images)
# unless --no-preset; --cfg and explicit flags win. Measured on checkerboard (docs/methods.md): the
# MeanFlow-family's logit-normal(-0.4, 1) times almost never reach s = 1, where one-step sampling
# starts, so 2D runs draw times uniformly; their adaptively weighted losses train better unclipped.
# MeanFlow's c = 1e-3 makes its weighted loss ~ log(err), which is mode-seeking on targets as noisy as
# 2D ones (samples collapse onto the squares' centres); c = 1 (about the per-sample error) halves
# the one-step distance; the minibatch's marginal velocity in place of eps - x0 removes most of the
# target's noise, and time frequencies capped at 12 (the target contains d/ds of the network, which
# high time frequencies make large): mean one-step SWD 0.056 (c = 1 alone, seeds 0-2) -> 0.036 (0-5).
# Keys other than "cfg" are loop flags, used when the flag is not given (LOOP_DEFAULTS otherwise).
PRESETS_2D = {
    "meanflow": {"cfg": {"time_dist": "uniform", "ratio_neq": 0.5, "adaptive_c": 1.0, "velocity": "batch",
                         "adaptive_reduce": "mean"},
                 "grad_clip": 0.0, "time_freq": 12.0},
    "imf": {"cfg": {"time_dist": "uniform", "ratio_neq": 0.5, "adaptive_p": 0.0, "adaptive_reduce": "mean"}},
    "scm": {"cfg": {"adaptive_weighting": False}, "grad_clip": 0.0},
    # the settings the 2D tables were measured with, where the paper-faithful DEFAULTS differ
    # (and one EMA for teacher and evaluation: the tables predate TVM's separate evaluation EMA)
    "tvm": {"cfg": {"time_dist": "uniform", "fm_time_mu": 0.0}, "eval_ema_decay": 0.0},
    "shortcut": {"cfg": {"sc_fraction": 0.25}, "teacher": "self"},
}
LOOP_DEFAULTS = {"grad_clip": 1.0, "time_freq": 32.0}
# --ema-decay when not given: the method's TEACHER_EMA_DECAY when it keeps a separate evaluation EMA and
# its teacher is the EMA (TVM: 0.99), else this.
EMA_DECAY = 0.995
# Method cfg keys the loop fills in itself (never from --cfg).
LOOP_OWNED_CFG = ("teacher", "step", "generator")
MIXED_PRECISION = ("none", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "blocks", "selective")
CP_MODES = ("ring", "ulysses")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs, resolved from the command line (see build_parser for each flag).

    ``method_cfg``: the method's cfg overrides (preset merged with --cfg), without the loop-owned keys;
    ``teacher``: "self" or "ema" (resolved from "auto"); ``grad_clip`` and ``time_freq`` resolved;
    ``out``: the output folder; ``fsdp``: whether --dp-shard was given (FSDP2 over a (replicate, shard)
    mesh; dp_shard and dp_replicate are then >= 1); ``eval_ema_decay``: the decay of the second,
    evaluation-only EMA (0: none, the --ema-decay EMA is evaluated), resolved from the method's
    EVAL_EMA_DECAY and the 2D preset; ``ema_decay`` resolved likewise (EMA_DECAY)."""
    method: str
    data: str
    steps: int
    batch: int
    lr: float
    lr_schedule: str
    grad_clip: float
    no_preset: bool
    ema_decay: float
    device: str
    out: Path
    resume: bool
    overwrite: bool
    seed: int
    model: str
    width: int
    depth: int
    time_freq: float
    cond: bool
    teacher_flag: str
    teacher: str
    method_cfg: dict
    cfg_items: tuple
    ckpt_every: int
    stop_after: int
    eval_samples: int
    no_eval: bool
    no_progress: bool
    threads: int
    backend: str
    dp_shard: Optional[int] = None
    dp_replicate: int = 1
    cp: int = 1
    cp_mode: str = "ring"
    reshard_after_forward: bool = True
    mixed_precision: str = "none"
    activation_checkpointing: str = "none"
    guidance_scale: Optional[float] = None
    guidance_interval: tuple = (0.0, 1.0)
    compile: str = "none"
    eval_ema_decay: float = 0.0
    extra: dict = field(default_factory=dict)
    warnings: tuple = ()  # flags given that have no effect in this run (printed by the CLI; not recorded)

    @property
    def fsdp(self) -> bool:
        return self.dp_shard is not None

    @property
    def stop(self) -> int:
        """The step this invocation ends at (--stop-after caps --steps)."""
        return min(self.steps, self.stop_after) if self.stop_after > 0 else self.steps

    def record(self) -> dict:
        """The resolved flags as primitives (stored in checkpoints and compared on --resume)."""
        d = asdict(self)
        d.pop("extra")
        d.pop("warnings")
        d["out"] = str(self.out)
        d["cfg_items"] = list(self.cfg_items)
        d["method_cfg"] = json.loads(json.dumps(self.method_cfg))
        return d


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _type_ok(value, default) -> bool:
    """A --cfg value fits a DEFAULTS entry: same kind (bool, number, str, list); None defaults take anything."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            isinstance(default, float) or float(value).is_integer())
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return True


def method_cfg_from_items(method, items) -> dict:
    """--cfg KEY=VALUE items -> {key: JSON value}; unknown keys and wrong value types are ValueErrors."""
    cfg = {}
    known = sorted(set(method.DEFAULTS) - set(LOOP_OWNED_CFG))
    for it in items:
        if "=" not in it:
            raise ValueError(f"--cfg: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        if k not in method.DEFAULTS or k in LOOP_OWNED_CFG:
            raise ValueError(f"--cfg: {method.NAME} has no setting {k!r}; settings: {known}")
        value = _parse_value(v)
        default = method.DEFAULTS[k]
        if not _type_ok(value, default):
            raise ValueError(f"--cfg {k}: expected a {type(default).__name__} like the default {default!r}, "
                             f"got {value!r}")
        bad = _non_finite(value)
        if bad is not None:
            raise ValueError(f"--cfg {k}: expected finite numbers, got {bad!r}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            value = int(value)
        cfg[k] = value
    return cfg


def _non_finite(value):
    """The first NaN or infinite number in a --cfg value (JSON reads NaN, Infinity, 1e999), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            bad = _non_finite(v)
            if bad is not None:
                return bad
    return None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pair_in(lo_ok, hi_ok=None):
    """A check of a [lo, hi] list: two finite numbers, lo <= hi, lo_ok(lo) and hi_ok(hi)."""
    def ok(v):
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_finite(x) for x in v) and v[0] <= v[1]
                and lo_ok(v[0]) and (hi_ok is None or hi_ok(v[1])))
    return ok


def _one_of(choices):
    return (lambda v: v in choices, f"one of {list(choices)}")


# The natural range of the method settings that have one (same key, same meaning in every method that
# has it); checked at config resolution for the keys of the run's method. Keys not listed: any finite
# value. The string settings are checked here too (the losses check them only at the first step).
CFG_RANGES = {
    "time_dist": _one_of(TIME_DISTS),
    "fm_time_dist": _one_of(TIME_DISTS),
    "velocity": _one_of(VELOCITIES),
    "adaptive_reduce": _one_of(REDUCTIONS),
    "param": _one_of(SCM_PARAMS),
    "ratio_neq": (lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    "sc_fraction": (lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]"),
    "cfg_dropout": (lambda v: 0.0 <= v < 1.0, "a probability in [0, 1)"),
    "time_sigma": (lambda v: v > 0, "a number > 0"),
    "fm_time_sigma": (lambda v: v > 0, "a number > 0"),
    "gap_sigma": (lambda v: v >= 0, "a number >= 0 (0: a fixed gap)"),
    "sigma_d": (lambda v: v > 0, "a number > 0"),
    "tangent_c": (lambda v: v > 0, "a number > 0 (it divides the tangent by its norm + tangent_c)"),
    "lag_weight": (lambda v: v >= 0, "a weight >= 0"),
    "fm_weight": (lambda v: v >= 0, "a weight >= 0"),
    "eul_weight": (lambda v: v >= 0, "a weight >= 0"),
    "sc_weight": (lambda v: v >= 0, "a weight >= 0"),
    "aux_weight": (lambda v: v >= 0, "a weight >= 0"),
    "adaptive_p": (lambda v: v >= 0, "a power >= 0 (0: unweighted)"),
    "adaptive_c": (lambda v: v >= 0, "a number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "base_steps": (lambda v: v >= 2 and v & (v - 1) == 0, "a power of two >= 2"),
    "cfg_omega_max": (lambda v: v >= 0, "a number >= 0 (0: off)"),
    "cfg_interval": (_pair_in(lambda lo: lo >= 0, lambda hi: hi <= 1), "[lo, hi] with 0 <= lo <= hi <= 1"),
}
# Ranges that differ between methods: (method, key) -> (check, expected).
METHOD_CFG_RANGES = {
    ("tvm", "time_dist"): _one_of(TIME_DISTS + ("tvm",)),  # "tvm": the paper's gap-based pairs
    ("tvm", "cfg_scale"): (lambda v: v > 0, "a guidance scale > 0 (1: off)"),
    ("tvm", "cfg_scale_range"): (lambda v: v is None or _pair_in(lambda lo: lo > 0)(v),
                                 "null (off) or [min, max] with 0 < min <= max"),
}


def check_method_cfg(method, cfg: dict) -> None:
    """Every setting of ``cfg`` (the method's cfg overrides: preset and --cfg) within its range
    (CFG_RANGES, METHOD_CFG_RANGES) and finite; ValueError naming the --cfg key otherwise. Also the
    adaptive weight sg[1 / (err + adaptive_c)^adaptive_p]: with adaptive_p > 0 it needs adaptive_c > 0
    (c = 0 makes the weight of an exactly fitted example 1/0, and its loss 0 * inf = NaN, e.g. at the first
    step of a zero-initialised output layer)."""
    for k, v in cfg.items():
        if k in LOOP_OWNED_CFG:
            continue
        bad = _non_finite(v)
        if bad is not None:
            raise ValueError(f"--cfg {k}: expected finite numbers, got {bad!r}")
        ok, expected = METHOD_CFG_RANGES.get((method.NAME, k), CFG_RANGES.get(k, (None, None)))
        if ok is not None and not (v is None and method.DEFAULTS.get(k) is None) and not ok(v):
            raise ValueError(f"--cfg {k}: expected {expected}, got {v!r}")
    c = {**method.DEFAULTS, **cfg}
    if c.get("time_dist") == "tvm" and c.get("ratio_neq", 1.0) != 1.0:
        raise ValueError(f"--cfg ratio_neq: time_dist 'tvm' draws only pairs with t != s, so ratio_neq must be 1; "
                         f"got {c['ratio_neq']!r} (or set --cfg time_dist=uniform / logit_normal)")
    if "adaptive_p" in c and c["adaptive_p"] > 0 and not c["adaptive_c"] > 0:
        raise ValueError(f"--cfg adaptive_c: expected a number > 0 with adaptive_p {c['adaptive_p']} > 0 (the weight "
                         f"1 / (err + c)^p of an exactly fitted example is 1/0 at c = 0; the loss NaN), "
                         f"got {c['adaptive_c']!r}")


def model_kind(model_flag: str, ds) -> str:
    """--model auto -> "mlp" for 2D data (or without flowmap_kernels.nn.DiT), "dit" for images."""
    if model_flag != "auto":
        return model_flag
    if ds.kind == "2d":
        return "mlp"
    try:
        from ..nn import DiT  # noqa: F401
        return "dit"
    except Exception:
        return "mlp"


def _check(cond: bool, flag: str, expected: str, got) -> None:
    if not cond:
        raise ValueError(f"{flag}: expected {expected}, got {got!r}")


def resolve_config(args) -> TrainConfig:
    """Validate parsed flags and resolve presets; ``args`` is read, never modified."""
    method = get_method(args.method)
    ds = get_dataset(args.data)
    _check(args.steps >= 1, "--steps", "an integer >= 1", args.steps)
    _check(args.batch >= 2, "--batch", "an integer >= 2", args.batch)
    _check(_finite(args.lr) and args.lr > 0, "--lr", "a finite number > 0", args.lr)
    _check(args.grad_clip is None or (_finite(args.grad_clip) and args.grad_clip >= 0), "--grad-clip",
           "a finite number >= 0 (0: off)", args.grad_clip)
    _check(args.width >= 1, "--width", "an integer >= 1", args.width)
    _check(args.depth >= 0, "--depth", "an integer >= 0", args.depth)
    _check(args.time_freq is None or (_finite(args.time_freq) and args.time_freq > 0), "--time-freq",
           "a finite number > 0", args.time_freq)
    _check(args.ckpt_every >= 1, "--ckpt-every", "an integer >= 1", args.ckpt_every)
    _check(args.stop_after >= 0, "--stop-after", "an integer >= 0 (0: off)", args.stop_after)
    _check(args.eval_samples >= 2, "--eval-samples", "an integer >= 2", args.eval_samples)
    _check(args.threads >= 0, "--threads", "an integer >= 0 (0: torch's default)", args.threads)
    # the loop seeds torch, numpy and the data generator with affine functions of --seed (64-bit seeds)
    _check(abs(args.seed) < 2 ** 32, "--seed", "an integer with |seed| < 2**32", args.seed)
    from ..backends import BACKEND_NAMES
    _check(args.backend in BACKEND_NAMES, "--backend", f"one of {list(BACKEND_NAMES)}", args.backend)
    dp_shard = getattr(args, "dp_shard", None)
    dp_replicate = getattr(args, "dp_replicate", None)
    cp = getattr(args, "cp", 1)
    _check(dp_shard is None or dp_shard >= 1, "--dp-shard", "an integer >= 1", dp_shard)
    _check(dp_replicate is None or dp_replicate >= 1, "--dp-replicate", "an integer >= 1", dp_replicate)
    _check(cp >= 1, "--cp", "an integer >= 1", cp)
    if (dp_replicate is not None or cp > 1) and dp_shard is None:
        raise ValueError(f"--{'dp-replicate' if dp_replicate is not None else 'cp'}: needs --dp-shard "
                         "(FSDP2 training); give --dp-shard 1 for replication or context parallelism alone")
    cp_mode = getattr(args, "cp_mode", "ring")
    _check(cp_mode in CP_MODES, "--cp-mode", f"one of {list(CP_MODES)}", cp_mode)
    mp = getattr(args, "mixed_precision", "none")
    _check(mp in MIXED_PRECISION, "--mixed-precision", f"one of {list(MIXED_PRECISION)}", mp)
    if mp != "none" and dp_shard is None:
        raise ValueError("--mixed-precision: applies to FSDP2 training; give --dp-shard too")
    ac = getattr(args, "activation_checkpointing", "none")
    comp = getattr(args, "compile", "none")
    from ..compiled_step import COMPILE_MODES
    _check(comp in COMPILE_MODES, "--compile", f"one of {list(COMPILE_MODES)}", comp)
    if comp != "none" and (dp_shard is not None or ac != "none"):
        other = "--dp-shard (FSDP2)" if dp_shard is not None else "--activation-checkpointing"
        raise ValueError(f"--compile: compiles a single-process step without {other}; drop one of the two")
    _check(ac in ACTIVATION_CHECKPOINTING, "--activation-checkpointing", f"one of {list(ACTIVATION_CHECKPOINTING)}", ac)
    kind = model_kind(args.model, ds)
    if cp > 1 and kind != "dit":
        raise ValueError(f"--cp: context parallelism splits the DiT's tokens; --model resolves to {kind!r}")
    if args.cond and not ds.num_classes:
        raise ValueError(f"--cond: dataset {ds.name!r} has no labels")
    if args.model == "dit" and ds.kind != "image":
        raise ValueError(f"--model dit: needs image data, {ds.name!r} is {ds.kind}")

    gs = getattr(args, "guidance_scale", None)
    gi_flag = getattr(args, "guidance_interval", None)
    gi = tuple(float(v) for v in (gi_flag or (0.0, 1.0)))
    guidance_mode = getattr(method, "GUIDANCE", "cfg")
    if guidance_mode == "cfg":  # V_null + omega (V_c - V_null): omega = 0 is the unconditional model
        _check(gs is None or (_finite(gs) and gs >= 0), "--guidance-scale", "a finite number >= 0", gs)
    else:  # the scale is a model input, embedded from log(omega)
        _check(gs is None or (_finite(gs) and gs > 0), "--guidance-scale",
               f"a finite number > 0 ({method.NAME} passes the guidance scale to the model, GUIDANCE "
               f"{guidance_mode!r})", gs)
    _check(len(gi) == 2 and 0.0 <= gi[0] <= gi[1] <= 1.0, "--guidance-interval", "LO HI with 0 <= LO <= HI <= 1", gi)
    if gs is not None and not args.cond:
        raise ValueError("--guidance-scale: classifier-free guidance needs --cond (class-conditional training)")
    notes = []
    if gi_flag is not None and gs is None:
        notes.append("--guidance-interval: has no effect without --guidance-scale (it limits guided sampling)")
    user_cfg = method_cfg_from_items(method, args.cfg)
    cd = getattr(args, "cfg_dropout", None)
    if cd is not None:
        _check(0.0 <= cd < 1.0, "--cfg-dropout", "a probability in [0, 1)", cd)
        if not args.cond:
            raise ValueError("--cfg-dropout: label dropout needs --cond (class-conditional training)")
        if "cfg_dropout" not in method.DEFAULTS:
            raise ValueError(f"--cfg-dropout: {method.NAME} has no classifier-free guidance setting")
        user_cfg["cfg_dropout"] = float(cd)
    preset = PRESETS_2D.get(args.method, {}) if ds.kind == "2d" and not args.no_preset else {}
    method_cfg = {**preset.get("cfg", {}), **user_cfg}
    check_method_cfg(method, method_cfg)
    _check_guided_target(method, method_cfg, args.cond, notes)
    if gs is not None:
        _check_guidance(method, method_cfg, kind, gs, notes)
    loop = {key: (getattr(args, key) if getattr(args, key) is not None else preset.get(key, default))
            for key, default in LOOP_DEFAULTS.items()}
    teacher = args.teacher if args.teacher != "auto" else preset.get("teacher", method.TEACHER or "self")
    if args.teacher != "auto" and "teacher" not in method.DEFAULTS:
        notes.append(f"--teacher {args.teacher}: has no effect with --method {method.NAME} (no stop-gradient teacher; "
                     f"methods with one: {sorted(n for n, m in METHODS.items() if 'teacher' in m.DEFAULTS)})")
    if ac != "none" and kind == "mlp":
        notes.append(f"--activation-checkpointing {ac}: saves no memory on the MLP (its checkpointed blocks are "
                     "single Linear layers, whose input autograd keeps anyway; 'selective' keeps attention "
                     "outputs, which the MLP has none of); it is meant for --model dit")
    if dp_shard is None and not getattr(args, "reshard_after_forward", True):
        notes.append("--no-reshard-after-forward: has no effect without FSDP2 (--dp-shard)")
    if cp == 1 and cp_mode != "ring":
        notes.append(f"--cp-mode {cp_mode}: has no effect without context parallelism (--cp > 1)")
    _check_backend(args.backend, kind, ds, args.device, mp, notes)
    eval_ema_decay = getattr(args, "eval_ema_decay", None)
    if eval_ema_decay is None:
        eval_ema_decay = preset.get("eval_ema_decay", getattr(method, "EVAL_EMA_DECAY", 0.0))
    _check(0.0 <= eval_ema_decay < 1.0, "--eval-ema-decay", "a value in [0, 1) (0: off)", eval_ema_decay)
    ema_decay = args.ema_decay
    if ema_decay is None:
        two = eval_ema_decay > 0 and teacher == "ema"
        ema_decay = getattr(method, "TEACHER_EMA_DECAY", EMA_DECAY) if two else EMA_DECAY
    _check(0.0 <= ema_decay < 1.0, "--ema-decay", "a value in [0, 1)", ema_decay)
    return TrainConfig(
        method=args.method, data=args.data, steps=args.steps, batch=args.batch, lr=args.lr,
        lr_schedule=args.lr_schedule, grad_clip=loop["grad_clip"], no_preset=args.no_preset,
        ema_decay=float(ema_decay), device=args.device, out=Path(args.out or f"runs/{args.method}_{args.data}"),
        resume=args.resume, overwrite=getattr(args, "overwrite", False), seed=args.seed, model=args.model,
        width=args.width, depth=args.depth, time_freq=loop["time_freq"], cond=args.cond,
        teacher_flag=args.teacher, teacher=teacher, method_cfg=method_cfg,
        cfg_items=tuple(args.cfg), ckpt_every=args.ckpt_every, stop_after=args.stop_after,
        eval_samples=args.eval_samples, no_eval=args.no_eval, no_progress=args.no_progress, threads=args.threads,
        backend=args.backend, dp_shard=dp_shard, dp_replicate=dp_replicate or 1, cp=cp, cp_mode=cp_mode,
        reshard_after_forward=getattr(args, "reshard_after_forward", True), mixed_precision=mp,
        activation_checkpointing=ac, compile=comp, guidance_scale=gs, guidance_interval=gi,
        eval_ema_decay=float(eval_ema_decay), warnings=tuple(notes))


def _check_guided_target(method, method_cfg: dict, cond: bool, notes: list) -> None:
    """A guided training target applies only to labelled runs (without --cond it is off: noted), and its
    unconditional velocity is the model's null class, which only label dropout trains: with --cond it
    needs cfg_dropout > 0 (ValueError naming --cfg-dropout; without it the target mixes in the output of an
    embedding row that never receives a gradient)."""
    keys = [f"{k}={json.dumps(v)}" for k, v in guided_target_settings(method, method_cfg).items()]
    if not keys:
        return
    if not cond:
        notes.append(f"--cfg {', '.join(keys)}: has no effect without --cond (guidance needs class labels)")
        return
    dropout = {**method.DEFAULTS, **method_cfg}.get("cfg_dropout", 0.0)
    if not dropout > 0:
        raise ValueError(f"--cfg-dropout: the guided target of --cfg {', '.join(keys)} uses the model's null class, "
                         f"which only label dropout trains; expected a probability in (0, 1) (e.g. --cfg-dropout "
                         f"0.1), got {dropout!r}")


def _check_guidance(method, method_cfg: dict, kind: str, gs: float, notes: list) -> None:
    """--guidance-scale S (with --cond) against what the run trains (ValueError naming the flag to fix):
    the null class that guided training and "cfg" sampling use is trained only by label dropout
    (cfg_dropout > 0); a method whose guidance is a model input (GUIDANCE "input": iMF, "scaled_input":
    TVM) needs the network built with that input, which its guidance settings decide (methods.
    guidance_input_dim); a scale outside the trained range is reported (extrapolated)."""
    c = {**method.DEFAULTS, **method_cfg}
    mode = getattr(method, "GUIDANCE", "cfg")
    if "cfg_dropout" not in c:
        raise ValueError(f"--guidance-scale: {method.NAME} has no classifier-free guidance setting (cfg_dropout)")
    if mode == "cfg" and gs == 1.0:
        return  # V_null + 1 (V_c - V_null) = V_c: sampling is unguided
    if mode != "cfg" and guidance_input_dim(method, c, kind) < 1:
        if "cfg_scale_range" in method.DEFAULTS:
            hint = f"--cfg cfg_scale_range=[1,{max(gs, 1.0):g}] (scales drawn per example) or --cfg cfg_scale={gs:g}"
        elif "cfg_omega_max" in method.DEFAULTS:
            hint = f"--cfg cfg_omega_max={max(gs - 1.0, 1.0):g} (scales in [1, 1 + cfg_omega_max])"
        else:
            hint = "the method's guidance settings"
        raise ValueError(f"--guidance-scale: {method.NAME} samples with the guidance scale as a model input "
                         f"(GUIDANCE {mode!r}), and this run trains the model without one; train with it: {hint}")
    if not c["cfg_dropout"] > 0:
        raise ValueError(f"--cfg-dropout: --guidance-scale {gs:g} needs the null class, which only label dropout "
                         f"trains; expected a probability in (0, 1) (e.g. --cfg-dropout 0.1), got {c['cfg_dropout']!r}")
    # the scales the guidance input is trained on (dropped labels train omega = 1)
    if method.NAME == "tvm" and c.get("cfg_scale_range") is not None:
        lo, hi = (float(v) for v in c["cfg_scale_range"])
        trained, inside = f"[{lo:g}, {hi:g}] and 1", lo <= gs <= hi or gs == 1.0
    elif method.NAME == "tvm":
        trained, inside = f"{float(c['cfg_scale']):g} and 1", gs in (1.0, float(c["cfg_scale"]))
    elif method.NAME == "imf":
        hi = 1.0 + float(c["cfg_omega_max"])
        trained, inside = f"[1, {hi:g}]", 1.0 <= gs <= hi
    else:
        return
    if not inside:
        notes.append(f"--guidance-scale {gs:g}: not a scale this run trains the model's guidance input on "
                     f"({trained}); sampling extrapolates")


def _check_backend(name: str, kind: str, ds, device: str, mixed_precision: str, notes: list) -> None:
    """--backend other than "auto": every op of the model that has an implementation under that name must be
    able to run this run's calls (the same ``available`` / ``supports(explicit=True)`` the registry asks at
    the call, flowmap_kernels.backends); ValueError naming the flag otherwise. The MLP calls no op of the
    package (plain torch.nn layers): the flag has no effect there (noted)."""
    if name == "auto":
        return
    if kind == "mlp":
        notes.append(f"--backend {name}: has no effect on the MLP (plain torch.nn layers; no attention or fused "
                     "op of the package); it selects the kernels of --model dit")
        return
    import torch
    from ..attention.registry import ATTENTION
    from ..ops.registry import REGISTRIES
    try:
        from ..nn import dit_tiny
        from ..nn.layers import Attention
    except Exception as e:  # noqa: BLE001
        raise ValueError("--model dit: flowmap_kernels.nn.DiT is not importable") from e
    c, h, _ = ds.shape
    with torch.device("meta"):  # the network's attention shapes, without allocating it
        net = dit_tiny(input_size=h, in_channels=c, num_classes=ds.num_classes or 1)
    head_dims = sorted({m.head_dim for m in net.modules() if isinstance(m, Attention)})
    dev = torch.device(device)
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    problems = [(ATTENTION, dict(head_dim=d, v_head_dim=d)) for d in head_dims]
    problems += [(reg, dict(numel=1)) for reg in REGISTRIES.values()]
    for reg, problem in problems:
        impl = reg.impls.get(name)
        if impl is None:
            continue  # this op has no such implementation: its automatic choice runs
        if not impl.is_available():
            raise ValueError(f"--backend {name}: {reg.op}'s {name!r} implementation is not available in this "
                             f"install; use --backend auto")
        reason = impl.supports(explicit=True, device=dev, dtype=dtype, **problem)
        if reason is not None:
            raise ValueError(f"--backend {name}: {reg.op} cannot run on this run's tensors ({device}, {dtype}): "
                             f"{reason}")


# Flags that define the network (a checkpoint of another network cannot be continued): always, and for
# the MLP only; and method settings that change the module prepare_model builds (a method may list its
# own as MODEL_CFG).
MODEL_FLAGS = ("method", "data", "model", "cond")
MLP_FLAGS = ("width", "depth", "time_freq")
MODEL_CFG = {"scm": ("param", "sigma_d", "adaptive_weighting"), "imf": ("aux_head",)}
# Flags whose change is not reported on --resume (they do not change what is trained).
# --stop-after: where one invocation ends (the stop-then-resume workflow changes it by design).
UNREPORTED = ("resume", "overwrite", "out", "no_progress", "cfg_items", "teacher_flag", "stop_after")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def network_form(method_name: str, method_cfg: dict, cond: bool, guidance_scale, model_flag: str, ds) -> dict:
    """What the method settings add to the loop's network (loop.build_model): ``null_class`` (the MLP's
    null-class row: label dropout, a guided target or --guidance-scale; None for the DiT, which always has
    one), ``guidance_dim`` (iMF / TVM guidance inputs, with labels) and ``aux_velocity`` (iMF's aux_head)."""
    method, kind = get_method(method_name), model_kind(model_flag, ds)
    labels = ds.num_classes if cond else None
    null = (bool(labels) and (uses_null_class(method, method_cfg) or guidance_scale is not None)
            if kind == "mlp" else None)
    return dict(null_class=null, guidance_dim=guidance_input_dim(method, method_cfg, kind) if labels else 0,
                aux_velocity=uses_aux_velocity(method, method_cfg))


_FORM_SETTINGS = {"null_class": "--cfg-dropout, a guided target's --cfg keys or --guidance-scale",
                  "guidance_dim": "--cfg cfg_omega_max (iMF) / cfg_scale, cfg_scale_range (TVM)",
                  "aux_velocity": "--cfg aux_head"}


def compare_with_checkpoint(cfg: TrainConfig, saved: dict, ds) -> list:
    """Check a checkpoint's flags (``saved``: its record()) against this run's.

    Model-defining flags (MODEL_FLAGS; MLP_FLAGS for an MLP; --model compared after resolving "auto")
    must match: ValueError naming the first flag that differs. Returns ["--flag old -> new", ...] for every
    other flag that changed (the new value applies), in flag order."""
    if not isinstance(saved, dict):
        raise ValueError("--resume: the checkpoint holds no flag record")
    now = cfg.record()
    for key in MODEL_FLAGS + (MLP_FLAGS if model_kind(cfg.model, ds) == "mlp" else ()):
        if key not in saved:
            continue
        old, new = saved[key], now[key]
        if key == "model":
            old, new = model_kind(old, ds), model_kind(new, ds)
        if old != new:
            raise ValueError(f"--resume: the checkpoint was trained with {_flag(key)} {old}, this run has "
                             f"{_flag(key)} {new}; it defines the model, so it must match")
    method = get_method(cfg.method)
    saved_cfg = saved.get("method_cfg")
    if isinstance(saved_cfg, dict):
        for key in getattr(method, "MODEL_CFG", MODEL_CFG.get(cfg.method, ())):
            old = saved_cfg.get(key, method.DEFAULTS.get(key))
            new = cfg.method_cfg.get(key, method.DEFAULTS.get(key))
            if old != new:
                raise ValueError(f"--resume: the checkpoint was trained with --cfg {key}={old}, this run has "
                                 f"--cfg {key}={new}; it defines the model, so it must match")
    if isinstance(saved_cfg, dict):
        old_form = network_form(cfg.method, saved_cfg, saved.get("cond", cfg.cond), saved.get("guidance_scale"),
                                cfg.model, ds)
        new_form = network_form(cfg.method, cfg.method_cfg, cfg.cond, cfg.guidance_scale, cfg.model, ds)
        for key, old in old_form.items():
            if old != new_form[key]:
                raise ValueError(f"--resume: the checkpoint's network was built with {key} {old}, this run's would "
                                 f"have {key} {new_form[key]}; the settings that decide it ({_FORM_SETTINGS[key]}) "
                                 f"must match the checkpoint's")
    changed = []
    for key, new in now.items():
        if key in UNREPORTED or key in MODEL_FLAGS or key in MLP_FLAGS or key not in saved:
            continue
        if saved[key] != new:
            changed.append(f"{'--cfg' if key == 'method_cfg' else _flag(key)} {saved[key]} -> {new}")
    return changed
