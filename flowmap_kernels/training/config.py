"""Config resolution of the training loop: parsed flags -> a frozen ``TrainConfig`` (the flags are not modified).

Resolution order for the 2D presets: a method's DEFAULTS, then PRESETS_2D (2D data, unless --no-preset),
then --cfg; loop flags given as None (--grad-clip, --time-freq) take the preset's value, else LOOP_DEFAULTS.
Every check here runs before any work (no folder created, no process group joined): a bad flag is a
ValueError whose message starts with the flag's name (the CLI prints ``error: ...`` and exits with 2).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..data import get_dataset
from ..methods import get_method

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
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        elif isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            value = int(value)
        cfg[k] = value
    return cfg


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
    _check(args.lr > 0 and args.lr == args.lr, "--lr", "a positive number", args.lr)
    _check(args.grad_clip is None or args.grad_clip >= 0, "--grad-clip", "a number >= 0", args.grad_clip)
    _check(args.width >= 1, "--width", "an integer >= 1", args.width)
    _check(args.depth >= 0, "--depth", "an integer >= 0", args.depth)
    _check(args.time_freq is None or args.time_freq > 0, "--time-freq", "a positive number", args.time_freq)
    _check(args.ckpt_every >= 1, "--ckpt-every", "an integer >= 1", args.ckpt_every)
    _check(args.stop_after >= 0, "--stop-after", "an integer >= 0 (0: off)", args.stop_after)
    _check(args.eval_samples >= 2, "--eval-samples", "an integer >= 2", args.eval_samples)
    _check(args.threads >= 0, "--threads", "an integer >= 0 (0: torch's default)", args.threads)
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
    gi = tuple(float(v) for v in (getattr(args, "guidance_interval", None) or (0.0, 1.0)))
    _check(gs is None or gs >= 0, "--guidance-scale", "a number >= 0", gs)
    _check(len(gi) == 2 and 0.0 <= gi[0] <= gi[1] <= 1.0, "--guidance-interval", "LO HI with 0 <= LO <= HI <= 1", gi)
    if gs is not None and not args.cond:
        raise ValueError("--guidance-scale: classifier-free guidance needs --cond (class-conditional training)")
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
    loop = {key: (getattr(args, key) if getattr(args, key) is not None else preset.get(key, default))
            for key, default in LOOP_DEFAULTS.items()}
    teacher = args.teacher if args.teacher != "auto" else preset.get("teacher", method.TEACHER or "self")
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
        teacher_flag=args.teacher, teacher=teacher, method_cfg={**preset.get("cfg", {}), **user_cfg},
        cfg_items=tuple(args.cfg), ckpt_every=args.ckpt_every, stop_after=args.stop_after,
        eval_samples=args.eval_samples, no_eval=args.no_eval, no_progress=args.no_progress, threads=args.threads,
        backend=args.backend, dp_shard=dp_shard, dp_replicate=dp_replicate or 1, cp=cp, cp_mode=cp_mode,
        reshard_after_forward=getattr(args, "reshard_after_forward", True), mixed_precision=mp,
        activation_checkpointing=ac, compile=comp, guidance_scale=gs, guidance_interval=gi,
        eval_ema_decay=float(eval_ema_decay))


# Flags that define the network (a checkpoint of another network cannot be continued): always, and for
# the MLP only; and method settings that change the module prepare_model builds (a method may list its
# own as MODEL_CFG).
MODEL_FLAGS = ("method", "data", "model", "cond")
MLP_FLAGS = ("width", "depth", "time_freq")
MODEL_CFG = {"scm": ("param", "sigma_d", "adaptive_weighting"), "imf": ("aux_head",)}
# Flags whose change is not reported on --resume (they do not change what is trained).
UNREPORTED = ("resume", "overwrite", "out", "no_progress", "cfg_items", "teacher_flag")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


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
    changed = []
    for key, new in now.items():
        if key in UNREPORTED or key in MODEL_FLAGS or key in MLP_FLAGS or key not in saved:
            continue
        if saved[key] != new:
            changed.append(f"{'--cfg' if key == 'method_cfg' else _flag(key)} {saved[key]} -> {new}")
    return changed
