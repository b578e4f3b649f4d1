"""Reference training loop for the flow-map methods, single process or data-parallel (torchrun).

    python -m flowmap_kernels.train                                   # demo: TVM on checkerboard
    python -m flowmap_kernels.train --method meanflow --data moons --steps 3000 --out runs/mf
    python -m flowmap_kernels.train --out runs/mf --steps 6000 --resume    # continue bit-for-bit
    torchrun --nproc_per_node 2 -m flowmap_kernels.train --method tvm --steps 200

Writes into --out (rank 0 only): checkpoint.pt (model, EMA, optimizer, all RNG states per rank, step,
loss history; loads with torch.load(weights_only=True)), metrics.json, loss_curve.png, samples.png, and
for 2D data reference.npy plus samples_nfe{1,2,4}.npy (10,000 points each). Flow-map methods are
sampled with 1, 2 and 4 steps from t = 1 to t = 0, flow matching with Euler at 1..64 steps. Metric:
sliced Wasserstein distance to fresh data (2D), Frechet distance on raw pixels (digits), with the
same metric for standard normal noise as the baseline. Samples use the EMA weights ("ema") and the raw
weights ("raw").

Data parallel: no DDP wrapper (torch.func.jvp cannot take one); rank 0's initial parameters are
broadcast, each rank draws its own data and noise (seed + rank), gradients are averaged by bucketed
all_reduce after every backward, and at the end the parameters are compared across ranks
(metrics.json: ranks_in_sync).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import sampling
from .data import DATASETS, get_dataset
from .methods import METHODS, get_method
from .metrics import frechet_distance, sliced_wasserstein
from .models import MLPFlowMap
from .training import (EMA, allreduce_grads, broadcast_module, close_distributed, init_distributed, load_checkpoint,
                       params_in_sync, rng_state, save_checkpoint, set_rng_state)

EVAL_SEED = 20261122

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
    "meanflow": {"cfg": {"time_dist": "uniform", "ratio_neq": 0.5, "adaptive_c": 1.0, "velocity": "batch"},
                 "grad_clip": 0.0, "time_freq": 12.0},
    "imf": {"cfg": {"time_dist": "uniform", "ratio_neq": 0.5}},
    "scm": {"cfg": {}, "grad_clip": 0.0},
}
LOOP_DEFAULTS = {"grad_clip": 1.0, "time_freq": 32.0}
CHECKPOINT = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    """Raised when the loss is NaN/inf; the message names the step and the last good checkpoint."""


def _parse_value(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowmap_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="tvm", help=f"one of {sorted(METHODS)}")
    p.add_argument("--data", default="checkerboard", help=f"one of {sorted(DATASETS)}")
    p.add_argument("--steps", type=int, default=3000, help="total optimisation steps (also the target of --resume)")
    p.add_argument("--batch", type=int, default=512, help="batch size per rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="cosine: decay to 1%% of --lr over --steps after a 2%% linear warm-up")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="max global grad norm (0: off; default 1.0, or the 2D preset's value)")
    p.add_argument("--no-preset", action="store_true", help="2D data: use the method DEFAULTS as they are")
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="output folder (default runs/<method>_<data>)")
    p.add_argument("--resume", action="store_true", help=f"continue from <out>/{CHECKPOINT}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["auto", "mlp", "dit"], default="auto",
                   help="auto: MLP for 2D data, flowmap_kernels.nn.DiT for images when available")
    p.add_argument("--width", type=int, default=128, help="MLP hidden width")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--time-freq", type=float, default=None,
                   help="MLP: highest time-embedding frequency (default 32, or the 2D preset's value)")
    p.add_argument("--cond", action="store_true", help="class-conditional (labels as model(..., y=))")
    p.add_argument("--teacher", choices=["auto", "self", "ema"], default="auto",
                   help="stop-gradient teacher for tvm/lsd/esd/shortcut (auto: the method's TEACHER)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method DEFAULTS entry (JSON value), repeatable")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this invocation after this many total steps (checkpointed; no evaluation); "
                        "the LR schedule still follows --steps, so --resume continues the same trajectory")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--no-eval", action="store_true", help="skip sampling/metrics/figures")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--backend", default="auto",
                   help="kernel backend for fk.attention and the fused ops (auto, naive, torch, triton, extension)")
    return p


def _method_cfg(method, items):
    cfg = {}
    for it in items:
        if "=" not in it:
            raise ValueError(f"--cfg: expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        if k not in method.DEFAULTS or k in ("teacher", "step", "generator"):
            raise ValueError(f"--cfg: {method.NAME} has no setting {k!r}; settings: "
                             f"{sorted(set(method.DEFAULTS) - {'teacher', 'step', 'generator'})}")
        cfg[k] = _parse_value(v)
    return cfg


def _has_dit() -> bool:
    try:
        from .nn import DiT  # noqa: F401
        return True
    except Exception:
        return False


def build_model(args, ds) -> torch.nn.Module:
    kind = args.model
    ncls = ds.num_classes if args.cond else None
    if args.cond and not ncls:
        raise ValueError(f"--cond: dataset {ds.name!r} has no labels")
    if kind == "auto":
        kind = "mlp" if ds.kind == "2d" or not _has_dit() else "dit"
    if kind == "mlp":
        return MLPFlowMap(ds.shape, hidden=args.width, depth=args.depth, num_classes=ncls, max_freq=args.time_freq)
    if ds.kind != "image":
        raise ValueError(f"--model dit: needs image data, {ds.name!r} is {ds.kind}")
    if not _has_dit():
        raise ValueError("--model dit: flowmap_kernels.nn.DiT is not importable")
    from .nn import dit_tiny
    c, h, _ = ds.shape
    return dit_tiny(input_size=h, in_channels=c, num_classes=ds.num_classes or 1)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out: cannot write to {str(out)!r} ({e.strerror or e})") from e


def _lr_at(args, step: int) -> float:
    if args.lr_schedule == "constant":
        return args.lr
    warm = max(1, int(0.02 * args.steps))
    if step < warm:
        return float(args.lr * (step + 1) / warm)
    frac = (step - warm) / max(1, args.steps - warm)
    return float(args.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))))


def _gather_rng(info, gen):
    st = rng_state(gen)
    if not info.enabled:
        return [st]
    import torch.distributed as dist
    allst = [None] * info.world_size
    dist.all_gather_object(allst, st)
    return allst


def run(args) -> dict:
    """Train as configured by parsed ``args``; returns the metrics dict (rank 0) or {} (other ranks)."""
    method = get_method(args.method)
    ds = get_dataset(args.data)
    mcfg = _method_cfg(method, args.cfg)
    preset = PRESETS_2D.get(args.method, {}) if ds.kind == "2d" and not args.no_preset else {}
    mcfg = {**preset.get("cfg", {}), **mcfg}
    for key, default in LOOP_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, default))
    if args.steps < 1:
        raise ValueError(f"--steps: expected >= 1, got {args.steps}")
    if args.batch < 2:
        raise ValueError(f"--batch: expected >= 2, got {args.batch}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from .backends import BACKEND_NAMES
    if args.backend not in BACKEND_NAMES:
        raise ValueError(f"--backend: expected one of {list(BACKEND_NAMES)}, got {args.backend!r}")
    info = init_distributed(args.device)
    device = torch.device(f"cuda:{info.local_rank}" if args.device == "cuda" else "cpu")
    out = Path(args.out or f"runs/{args.method}_{args.data}")
    if info.is_main:
        _check_out(out)
    ckpt_path = out / CHECKPOINT
    t_start = time.time()

    torch.manual_seed(args.seed)
    model = build_model(args, ds).to(device)
    broadcast_module(model)
    ema = EMA(model, args.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    data_gen = torch.Generator().manual_seed(1_000_003 * (args.seed + 1) + info.rank)
    torch.manual_seed(args.seed * 7919 + 17 + info.rank)
    np.random.seed((args.seed * 7919 + 17 + info.rank) % 2 ** 32)
    random.seed(args.seed * 7919 + 17 + info.rank)
    step, losses, train_time = 0, [], 0.0

    if args.resume:
        ck = load_checkpoint(str(ckpt_path), map_location=device)
        for key in ("method", "data"):
            if ck["args"][key] != getattr(args, key):
                raise ValueError(f"--resume: checkpoint was trained with --{key} {ck['args'][key]}, "
                                 f"not {getattr(args, key)}")
        if ck["world_size"] != info.world_size:
            raise ValueError(f"--resume: checkpoint has world_size {ck['world_size']}, this run {info.world_size}")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        set_rng_state(ck["rng"][info.rank], data_gen)
        step, losses, train_time = int(ck["step"]), list(ck["losses"]), float(ck["train_time"])

    teacher_mode = args.teacher if args.teacher != "auto" else (method.TEACHER or "self")

    def checkpoint_state(at_step):
        return {"format": 1, "step": at_step, "model": model.state_dict(), "ema": ema.state_dict(),
                "opt": opt.state_dict(), "rng": _gather_rng(info, data_gen), "losses": list(losses),
                "train_time": train_time, "world_size": info.world_size,
                "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}

    last_good = step if args.resume else None
    bar = None
    if info.is_main and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.steps, initial=step, desc=f"{args.method}/{args.data}", dynamic_ncols=True)
    params = list(model.parameters())
    t0 = time.time()
    stop = min(args.steps, args.stop_after) if args.stop_after > 0 else args.steps
    while step < stop:
        for gparam in opt.param_groups:
            gparam["lr"] = _lr_at(args, step)
        x0, y = ds.sample(args.batch, generator=data_gen, with_labels=True)
        x0 = x0.to(device)
        cond = y.to(device) if args.cond else None
        cfg = dict(mcfg)
        if "teacher" in method.DEFAULTS and teacher_mode == "ema":
            cfg["teacher"] = ema.module
        if "step" in method.DEFAULTS:
            cfg["step"] = step
        loss, logs = method.loss(model, x0, cond=cond, **cfg)
        lv = loss.detach().clone()
        if info.enabled:
            import torch.distributed as dist
            dist.all_reduce(lv)
            lv /= info.world_size
        lval = float(lv)
        if not np.isfinite(lval):
            if bar is not None:
                bar.close()
            where = f"{ckpt_path} (step {last_good})" if last_good is not None else "none written yet"
            raise NonFiniteLoss(f"non-finite loss ({lval}) at step {step + 1}; stopped. Last good checkpoint: {where}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        allreduce_grads(params, info.world_size)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        ema.update(model)
        losses.append(lval)
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 25 == 0 or step == args.steps:
                bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if step % args.ckpt_every == 0 or step == stop:
            train_time += time.time() - t0
            t0 = time.time()
            st = checkpoint_state(step)
            if info.is_main:
                save_checkpoint(str(ckpt_path), st)
            last_good = step
    if bar is not None:
        bar.close()
    in_sync = params_in_sync(model) and params_in_sync(ema.module)
    if not info.is_main or stop < args.steps:
        return {}
    metrics = {"method": args.method, "data": args.data, "steps": args.steps, "batch_per_rank": args.batch,
               "world_size": info.world_size, "ranks_in_sync": in_sync,
               "final_loss": losses[-1] if losses else None,
               "final_loss_mean100": float(np.mean(losses[-100:])) if losses else None,
               "train_time_s": round(train_time, 3),
               "sec_per_step": round(train_time / max(1, len(losses)), 5),
               "nominal_fpe": method.NOMINAL_FPE, "calls": method.CALLS,
               "method_cfg": {k: v for k, v in {**method.DEFAULTS, **mcfg}.items()
                              if k not in ("teacher", "generator", "step")},
               "teacher": teacher_mode if "teacher" in method.DEFAULTS else None, "grad_clip": args.grad_clip,
               "lr": args.lr, "lr_schedule": args.lr_schedule, "ema_decay": args.ema_decay, "time_freq": args.time_freq,
               "params": sum(p.numel() for p in model.parameters()), "device": str(device),
               "backend": args.backend}
    if not args.no_eval:
        metrics.update(evaluate(method, ds, model, ema.module, out, args, device))
    metrics["wall_time_s"] = round(time.time() - t_start, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@torch.no_grad()
def evaluate(method, ds, model, ema_model, out: Path, args, device) -> dict:
    """Sample at each step count with EMA and raw weights; metrics, .npy files and figures."""
    from .training import plots
    nfes = [1, 2, 4, 8, 16, 32, 64] if method.SAMPLER == "euler" else [1, 2, 4]
    g = torch.Generator().manual_seed(EVAL_SEED)
    n = args.eval_samples
    model.eval()
    res = {"sampler": method.SAMPLER, "nfe": {}}
    if ds.kind == "2d":
        ref = ds.sample(n, generator=g)
        noise = torch.randn((n, *ds.shape), generator=g)
        baseline_noise = torch.randn((n, *ds.shape), generator=g)
        fresh = ds.sample(n, generator=g)
        res.update(metric="swd", baseline_noise=sliced_wasserstein(baseline_noise.numpy(), ref.numpy()),
                   data_vs_data=sliced_wasserstein(fresh.numpy(), ref.numpy()))
        np.save(out / "reference.npy", ref.numpy())
    else:
        ref = ds.sample(n, generator=g)  # with replacement from the 1797 digits
        noise = torch.randn((min(n, 2000), *ds.shape), generator=g)
        res.update(metric="fd", baseline_noise=frechet_distance(torch.randn((2000, *ds.shape), generator=g).numpy(),
                                                                ref.numpy()),
                   data_vs_data=frechet_distance(ds.sample(2000, generator=g).numpy(), ref.numpy()))
    ncls = ds.num_classes if args.cond else None
    cond = (torch.arange(noise.shape[0]) % ncls).to(device) if ncls else None
    metric = sliced_wasserstein if ds.kind == "2d" else frechet_distance
    shown = {}
    for k in nfes:
        entry = {}
        for name, net in (("ema", ema_model), ("raw", model)):
            sg = torch.Generator(device=device).manual_seed(EVAL_SEED + k)
            x = sampling.sample(method, net, noise.to(device), k, cond=cond, generator=sg).cpu()
            entry[name] = metric(x.numpy(), ref.numpy())
            if name == "ema":
                if ds.kind == "2d" and k in (1, 2, 4):
                    np.save(out / f"samples_nfe{k}.npy", x.numpy())
                if k in (1, 2, 4) or k == nfes[-1]:
                    shown[f"{'Euler ' if method.SAMPLER == 'euler' else ''}{k} step{'s' if k > 1 else ''}"
                          f" ({res['metric']} {entry['ema']:.3f})"] = x.numpy()
        entry["ratio_to_noise_ema"] = entry["ema"] / res["baseline_noise"]
        res["nfe"][str(k)] = entry
    model.train()
    title = f"{args.method} on {args.data}, {args.steps} steps (EMA weights)"
    plots.loss_curve(getattr(args, "_losses", None) or _losses_from_ckpt(out), out / "loss_curve.png",
                     f"{args.method} on {args.data}")
    if ds.kind == "2d":
        plots.scatter_2d(ref.numpy(), shown, out / "samples.png", title)
    else:
        for name, x in shown.items():
            k = name.split(" step")[0].split()[-1]
            plots.image_grid(x, out / f"samples_nfe{k}.png", f"{args.method}: {name}")
    return res


def _losses_from_ckpt(out: Path):
    return load_checkpoint(str(out / CHECKPOINT))["losses"]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    finished = False
    try:
        get_method(args.method)
        get_dataset(args.data)
        from .backends import BACKEND_NAMES, use_backend
        if args.backend not in BACKEND_NAMES:
            raise ValueError(f"--backend: expected one of {list(BACKEND_NAMES)}, got {args.backend!r}")
        with use_backend(args.backend):
            metrics = run(args)
        finished = True
    except (ValueError, PermissionError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed(barrier=finished)
    if metrics:
        nfe = metrics.get("nfe", {})
        summary = ", ".join(f"{k} step{'s' if k != '1' else ''}: {v['ema']:.4f}" for k, v in nfe.items())
        if nfe:
            print(f"{metrics['metric']} to fresh data (noise baseline {metrics['baseline_noise']:.4f}): {summary}")
        print(f"wrote {args.out or f'runs/{args.method}_{args.data}'}/metrics.json "
              f"(train {metrics['train_time_s']:.1f}s, ranks_in_sync={metrics['ranks_in_sync']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
