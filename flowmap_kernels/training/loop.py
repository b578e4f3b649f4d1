"""The training loop, in parts: setup (model, optimizer, EMA, data, distributed), step, checkpoint, run.

Parallel layouts (see flowmap_kernels.train for the flags):

- one process, or plain data parallel under torchrun without --dp-shard: full parameters on every rank,
  rank 0's initial parameters broadcast, gradients averaged by training.distributed.allreduce_grads,
  single-file checkpoint.pt;
- FSDP2 (--dp-shard N, optionally --dp-replicate M for HSDP and --cp K): model and EMA(s) sharded by
  flowmap_kernels.distributed.apply_fsdp over a (dp_replicate, dp_shard, cp) mesh; gradients
  reduce-scattered by FSDP; sharded checkpoints (torch.distributed.checkpoint) under checkpoint_sharded/.

Each data-parallel rank draws its own data and noise (seeds offset by its data-parallel rank; the cp
ranks of one group draw the same).

EMAs: ``st.ema`` (--ema-decay) is the teacher of the methods with TEACHER "ema" and, alone, also the
weights evaluated. With --eval-ema-decay > 0 (TVM's default, arXiv:2511.19797: a fast teacher EMA and a
slow one for evaluation) a second EMA ``st.eval_ema`` is kept, updated after every step with its own
decay and warm-up counter, sharded, checkpointed and resumed like the first, and used for sampling.
"""
from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import get_dataset
from ..methods import get_method
from ..models import MLPFlowMap
from .checkpoint import (latest_sharded, load_checkpoint, load_sharded, load_sharded_extras, rng_state,
                         save_checkpoint, save_sharded, set_rng_state)
from .config import TrainConfig, compare_with_checkpoint, model_kind, network_form
from .distributed import DistInfo, allreduce_grads, broadcast_module, init_distributed, params_in_sync
from .ema import EMA

__all__ = ["CHECKPOINT", "SHARDED_DIR", "NonFiniteLoss", "TrainState", "build_model", "build_network", "setup",
           "train_step", "save", "train", "finish", "run", "lr_at"]

CHECKPOINT = "checkpoint.pt"
SHARDED_DIR = "checkpoint_sharded"


class NonFiniteLoss(RuntimeError):
    """Raised when the loss is NaN/inf; the message names the step and the last good checkpoint."""


def build_model(cfg: TrainConfig, ds) -> torch.nn.Module:
    """MLPFlowMap (2D data, or --model mlp) or flowmap_kernels.nn.dit_tiny (images), unsharded."""
    kind = model_kind(cfg.model, ds)
    ncls = ds.num_classes if cfg.cond else None
    form = network_form(cfg.method, cfg.method_cfg, cfg.cond, cfg.guidance_scale, cfg.model, ds)
    gdim = form["guidance_dim"]
    aux = {"aux_velocity": True} if form["aux_velocity"] else {}  # iMF's velocity head
    if kind == "mlp":
        # classifier-free guidance only: the null-class row and guidance input change the network (its
        # initialisation too), so runs without CFG build exactly the network they always did
        return MLPFlowMap(ds.shape, hidden=cfg.width, depth=cfg.depth, num_classes=ncls, max_freq=cfg.time_freq,
                          null_class=form["null_class"], guidance_dim=gdim, **aux)
    try:
        from ..nn import dit_tiny
    except Exception as e:  # noqa: BLE001
        raise ValueError("--model dit: flowmap_kernels.nn.DiT is not importable") from e
    c, h, _ = ds.shape
    return dit_tiny(input_size=h, in_channels=c, num_classes=ds.num_classes or 1, guidance_dim=gdim, **aux)


def build_network(cfg: TrainConfig, ds, method) -> torch.nn.Module:
    """build_model, then the method's prepare_model (sCM: TrigFlow wrapper, learned loss weight;
    the network itself for the other methods)."""
    from ..methods import prepare_model
    return prepare_model(method, build_model(cfg, ds), dict(cfg.method_cfg))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Constant, or cosine from lr to 1% of it over cfg.steps after a 2% linear warm-up."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(1, int(0.02 * cfg.steps))
    if step < warm:
        return float(cfg.lr * (step + 1) / warm)
    frac = (step - warm) / max(1, cfg.steps - warm)
    return float(cfg.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * min(frac, 1.0)))))


@dataclass
class TrainState:
    """What the loop carries: config, method and data; distributed info and mesh (None without FSDP);
    model, EMA (teacher, and evaluated when there is no evaluation EMA), optimizer, the data generator; step,
    losses, train time; last checkpointed step; the evaluation EMA (--eval-ema-decay > 0) or None."""
    cfg: TrainConfig
    method: object
    ds: object
    info: DistInfo
    device: torch.device
    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    data_gen: torch.Generator
    mesh: object = None
    dp_rank: int = 0
    step: int = 0
    losses: list = field(default_factory=list)
    train_time: float = 0.0
    last_good: Optional[int] = None
    sharded_ckpt: bool = False
    compiled: object = None  # --compile: the flowmap_kernels.compiled_step.TrainStep
    eval_ema: Optional[EMA] = None

    @property
    def out(self) -> Path:
        return self.cfg.out

    @property
    def emas(self) -> tuple:
        """(("ema", EMA), ("eval_ema", EMA)) for the EMAs this run keeps, in update order."""
        return (("ema", self.ema),) + ((("eval_ema", self.eval_ema),) if self.eval_ema is not None else ())

    @property
    def sampling_ema(self) -> EMA:
        """The EMA whose weights are evaluated: the evaluation EMA when there is one, else the teacher's."""
        return self.ema if self.eval_ema is None else self.eval_ema

    def update_emas(self) -> None:
        for _, e in self.emas:
            e.update(self.model)


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"--out: cannot write to {str(out)!r} ({e.strerror or e})") from e


def _existing_checkpoints(out: Path) -> list:
    return [p for p in (out / CHECKPOINT, out / SHARDED_DIR) if p.exists()]


def _gather_rng(info: DistInfo, gen) -> list:
    st = rng_state(gen)
    if not info.enabled:
        return [st]
    import torch.distributed as dist
    allst = [None] * info.world_size
    dist.all_gather_object(allst, st)
    return allst


def _broadcast_error(info: DistInfo, err: Optional[Exception]) -> None:
    """Raise on every rank when rank 0 found a problem (so no rank waits for the others forever)."""
    if not info.enabled:
        if err is not None:
            raise err
        return
    import torch.distributed as dist
    box = [None if err is None else (type(err).__name__, str(err))]
    dist.broadcast_object_list(box, 0)
    if box[0] is not None:
        kind, msg = box[0]
        raise {"PermissionError": PermissionError, "FileNotFoundError": FileNotFoundError}.get(kind, ValueError)(msg)


def _prepare_out(cfg: TrainConfig, info: DistInfo) -> None:
    """Rank 0: the folder is writable; without --resume, an existing checkpoint needs --overwrite (then
    it is removed). Errors reach every rank."""
    err = None
    if info.is_main:
        try:
            if cfg.resume and not cfg.out.exists():  # nothing to resume: leave no empty folder behind
                raise FileNotFoundError(f"--resume: no checkpoint at {cfg.out / CHECKPOINT} ({cfg.out} does not exist)")
            _check_out(cfg.out)
            found = _existing_checkpoints(cfg.out)
            if found and not cfg.resume:
                if not cfg.overwrite:
                    raise ValueError(f"--out: {cfg.out} already holds a checkpoint ({found[0].name}); pass --resume "
                                     "to continue it or --overwrite to start over")
                for p in found:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        except (ValueError, PermissionError, FileNotFoundError) as e:
            err = e
    _broadcast_error(info, err)


def _mesh_and_shard(cfg: TrainConfig, info: DistInfo, model, emas):
    """FSDP2: the (dp_replicate, dp_shard, cp) mesh; activation checkpointing, context parallelism and
    fully_shard applied to the model and (sharded the same way) the EMA copies ``emas`` (EMA objects).
    Returns (mesh, dp_rank)."""
    from ..distributed.fsdp import apply_fsdp, make_mesh
    world = info.world_size
    if cfg.dp_replicate * cfg.dp_shard * cfg.cp != world:
        raise ValueError(f"--dp-shard: --dp-replicate {cfg.dp_replicate} x --dp-shard {cfg.dp_shard} x --cp {cfg.cp} "
                         f"= {cfg.dp_replicate * cfg.dp_shard * cfg.cp} processes, but this run has {world}")
    mesh = make_mesh(cfg.dp_replicate, cfg.dp_shard, cfg.cp, device_type="cuda" if cfg.device == "cuda" else "cpu")
    if cfg.activation_checkpointing != "none":
        from ..activation_checkpoint import apply_activation_checkpointing
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.cp > 1:
        from ..distributed import context_parallel
        for m in (model, *(e.module for e in emas)):
            context_parallel(m, mesh["cp"].get_group(), mode=cfg.cp_mode)
    from ..distributed.fsdp import fsdp_blocks
    for m, reshard in ((model, cfg.reshard_after_forward), *((e.module, True) for e in emas)):
        # a learned loss weight (sCM) is called by the loss outside the model's forward: its own unit.
        # The EMA copies only run forwards (no backward would reshard them): always resharded after them.
        extra = [m.loss_weight] if isinstance(getattr(m, "loss_weight", None), torch.nn.Module) else []
        apply_fsdp(m, mesh, reshard_after_forward=reshard, mixed_precision=cfg.mixed_precision,
                   blocks=fsdp_blocks(m) + extra)
    dp_rank = info.rank // cfg.cp  # ranks are laid out (dp_replicate, dp_shard, cp), cp fastest
    return mesh, dp_rank


def setup(cfg: TrainConfig) -> TrainState:
    """Process group, output folder, model (+ EMA, sharded under FSDP2), optimizer, seeded RNGs, and the
    --resume state. Order of RNG use is fixed (seeded runs are reproducible bit for bit)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.fsdp:
        import warnings
        # MLPFlowMap returns a reshape (a view); the losses and samplers never modify model outputs in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    method, ds = get_method(cfg.method), get_dataset(cfg.data)
    info = init_distributed(cfg.device, single_process_group=cfg.fsdp)
    device = torch.device(f"cuda:{info.local_rank}" if cfg.device == "cuda" else "cpu")
    _prepare_out(cfg, info)

    torch.manual_seed(cfg.seed)
    model = build_network(cfg, ds, method).to(device)  # prepared before the optimizer and the EMA copy
    broadcast_module(model)
    ema = EMA(model, cfg.ema_decay)
    eval_ema = EMA(model, cfg.eval_ema_decay) if cfg.eval_ema_decay > 0 else None
    mesh, dp_rank = None, info.rank
    if cfg.fsdp:
        mesh, dp_rank = _mesh_and_shard(cfg, info, model, [e for e in (ema, eval_ema) if e is not None])
    elif cfg.activation_checkpointing != "none":
        from ..activation_checkpoint import apply_activation_checkpointing
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    data_gen = torch.Generator().manual_seed(1_000_003 * (cfg.seed + 1) + dp_rank)
    torch.manual_seed(cfg.seed * 7919 + 17 + dp_rank)
    np.random.seed((cfg.seed * 7919 + 17 + dp_rank) % 2 ** 32)
    random.seed(cfg.seed * 7919 + 17 + dp_rank)
    st = TrainState(cfg=cfg, method=method, ds=ds, info=info, device=device, model=model, ema=ema, opt=opt,
                    data_gen=data_gen, mesh=mesh, dp_rank=dp_rank, sharded_ckpt=cfg.fsdp, eval_ema=eval_ema)
    if cfg.compile != "none":
        if info.world_size > 1:
            raise ValueError("--compile: the compiled step runs in one process (its gradients are not all-reduced)")
        from ..compiled_step import TrainStep
        mcfg = dict(cfg.method_cfg)
        if "teacher" in method.DEFAULTS and cfg.teacher == "ema":
            mcfg["teacher"] = ema.module
        st.compiled = TrainStep(model, method, opt, compile=cfg.compile, grad_clip=cfg.grad_clip, method_cfg=mcfg,
                                backend=cfg.extra.get("compile_backend"))
    if cfg.resume:
        _resume(st)
    return st


def _dcp_state(st: TrainState) -> dict:
    """The tensors of a sharded checkpoint: model and optimizer (FQN-keyed), EMA model(s) ("ema", and
    "eval_ema" when the run keeps one)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    model_sd, optim_sd = get_state_dict(st.model, st.opt)
    return {"model": model_sd, "optim": optim_sd, **{k: get_model_state_dict(e.module) for k, e in st.emas}}


def _ema_counters(st: TrainState) -> dict:
    """What a checkpoint keeps of each EMA besides its weights: {"ema": {...}, "eval_ema": {...}}."""
    return {k: {"num_updates": e.num_updates, "decay": e.decay} for k, e in st.emas}


def _check_eval_ema_saved(st: TrainState, saved: dict, where) -> None:
    """--eval-ema-decay > 0 resumes only from a checkpoint that holds an evaluation EMA (``saved``: the
    checkpoint's dict or extras)."""
    if st.eval_ema is not None and "eval_ema" not in saved:
        raise ValueError(f"--eval-ema-decay: the checkpoint {where} holds no evaluation EMA (written with "
                         "--eval-ema-decay 0); resume with --eval-ema-decay 0")


def _check_resume(st: TrainState, saved_args: dict, saved_step: int, where: str) -> list:
    """Flags against the checkpoint's (ValueError for a model-defining one) and --steps >= its step;
    returns the report of the other changed flags (printed once the checkpoint has loaded)."""
    changed = compare_with_checkpoint(st.cfg, saved_args, st.ds)
    if st.cfg.steps < saved_step:
        raise ValueError(f"--steps: {st.cfg.steps} is below the step {saved_step} of the checkpoint {where}")
    return [f"warning: --resume: flags changed since {where} (the new values apply): " + "; ".join(changed)] \
        if changed else []


def _resume(st: TrainState) -> None:
    """Load the checkpoint in --out: the sharded folder when present (any world size, FSDP2 or not), else
    checkpoint.pt (the same world size without FSDP2; any under FSDP2, through full state dicts). Flags
    are checked first (config.compare_with_checkpoint)."""
    cfg, info = st.cfg, st.info
    sharded = latest_sharded(cfg.out / SHARDED_DIR) if (cfg.out / SHARDED_DIR / "LATEST").exists() else None
    if sharded is not None:
        ex = load_sharded_extras(sharded)
        report = _check_resume(st, ex["args"], int(ex["step"]), sharded)
        _check_eval_ema_saved(st, ex, sharded)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
        tensors = _dcp_state(st)
        load_sharded(sharded, tensors)
        set_state_dict(st.model, st.opt, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
        for k, e in st.emas:
            set_model_state_dict(e.module, tensors[k])
            e.num_updates = int(ex[k]["num_updates"])
        # rank r continues rank r's streams when the checkpoint had it (same or smaller world), else keeps
        # its fresh seeding (a larger world: new ranks draw new data)
        if st.dp_rank < len(ex["rng"]):
            set_rng_state(ex["rng"][info.rank if ex["world_size"] == info.world_size else st.dp_rank], st.data_gen)
        st.step, st.losses, st.train_time = int(ex["step"]), list(ex["losses"]), float(ex["train_time"])
        st.sharded_ckpt = True
    else:
        path = cfg.out / CHECKPOINT
        ck = load_checkpoint(str(path), map_location=st.device)
        report = _check_resume(st, ck["args"], int(ck["step"]), str(path))
        _check_eval_ema_saved(st, ck, path)
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            full = StateDictOptions(full_state_dict=True)
            try:
                set_model_state_dict(st.model, ck["model"], options=full)
                for k, e in st.emas:
                    set_model_state_dict(e.module, ck[k]["module"], options=full)
                names = [n for n, _ in st.model.named_parameters()]
                osd = {"state": {names[int(i)]: s for i, s in ck["opt"]["state"].items()},
                       "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                        for g in ck["opt"]["param_groups"]]}
                set_optimizer_state_dict(st.model, st.opt, osd, options=full)
            except (RuntimeError, KeyError, IndexError, ValueError) as e:
                raise ValueError(f"--resume: {path} does not fit this model ({str(e)[:300]})") from e
        else:
            if ck["world_size"] != info.world_size:
                raise ValueError(f"--resume: {path} was written by {ck['world_size']} process(es), this run has "
                                 f"{info.world_size}; a single-file checkpoint resumes on the same world size "
                                 "(FSDP2 runs, --dp-shard, write sharded checkpoints that reshard)")
            try:
                st.model.load_state_dict(ck["model"])
                for k, e in st.emas:
                    e.load_state_dict(ck[k])
                st.opt.load_state_dict(ck["opt"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise ValueError(f"--resume: {path} does not fit this model ({str(e)[:300]})") from e
        for k, e in st.emas:
            e.num_updates = int(ck[k]["num_updates"])
        if info.rank < len(ck["rng"]):
            set_rng_state(ck["rng"][info.rank], st.data_gen)
        st.step, st.losses, st.train_time = int(ck["step"]), list(ck["losses"]), float(ck["train_time"])
    st.ema.decay = cfg.ema_decay  # a changed --ema-decay / --eval-ema-decay applies (reported)
    if st.eval_ema is not None:
        st.eval_ema.decay = cfg.eval_ema_decay
    st.last_good = st.step
    if report and info.is_main:
        print(report[0], file=sys.stderr)


def train_step(st: TrainState, teacher) -> float:
    """One optimisation step at st.step: LR, batch, loss (NonFiniteLoss when not finite), backward,
    gradient sync (plain data parallel only; FSDP2 reduce-scatters in backward), clipping, Adam, EMA(s).
    Returns the loss averaged over ranks."""
    cfg, info = st.cfg, st.info
    for gparam in st.opt.param_groups:
        gparam["lr"] = lr_at(cfg, st.step)
    x0, y = st.ds.sample(cfg.batch, generator=st.data_gen, with_labels=True)
    x0 = x0.to(st.device)
    cond = y.to(st.device) if cfg.cond else None
    if st.compiled is not None:
        return _compiled_train_step(st, x0, cond)
    mcfg = dict(cfg.method_cfg)
    if "teacher" in st.method.DEFAULTS and teacher is not None:
        mcfg["teacher"] = teacher
    if "step" in st.method.DEFAULTS:
        mcfg["step"] = st.step
    loss, _logs = st.method.loss(st.model, x0, cond=cond, **mcfg)
    lv = loss.detach().clone()
    if info.enabled:
        import torch.distributed as dist
        dist.all_reduce(lv)
        lv /= info.world_size
    lval = float(lv)
    if not np.isfinite(lval):
        where = f"{_ckpt_location(st)} (step {st.last_good})" if st.last_good is not None else "none written yet"
        raise NonFiniteLoss(f"non-finite loss ({lval}) at step {st.step + 1}; stopped. Last good checkpoint: {where}")
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(st.model.parameters())
    if not cfg.fsdp:
        allreduce_grads(params, info.world_size)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    st.opt.step()
    st.update_emas()
    st.losses.append(lval)
    st.step += 1
    return lval


def _compiled_train_step(st: TrainState, x0, cond) -> float:
    """--compile: loss, backward, clipping and Adam in one compiled call (flowmap_kernels.compiled_step), then
    the finiteness check (after the update: a non-finite loss stops the run, resume from the last good
    checkpoint) and the EMA update(s)."""
    kw = {"step": st.step} if "step" in st.method.DEFAULTS else {}
    loss, _logs = st.compiled(x0, cond, **kw)
    lval = float(loss)
    if not np.isfinite(lval):
        where = f"{_ckpt_location(st)} (step {st.last_good})" if st.last_good is not None else "none written yet"
        raise NonFiniteLoss(f"non-finite loss ({lval}) at step {st.step + 1}; stopped. Last good checkpoint: {where}")
    st.update_emas()
    st.losses.append(lval)
    st.step += 1
    return lval


def _ckpt_location(st: TrainState) -> Path:
    return st.out / (SHARDED_DIR if st.sharded_ckpt else CHECKPOINT)


def save(st: TrainState) -> None:
    """Checkpoint at st.step: sharded (collective) for FSDP2 runs and runs resumed from a sharded
    checkpoint, else checkpoint.pt written by rank 0."""
    rng = _gather_rng(st.info, st.data_gen)
    if st.sharded_ckpt:
        extras = {"format": 2, "step": st.step, "losses": list(st.losses), "train_time": st.train_time,
                  "world_size": st.info.world_size, "rng": rng, "args": st.cfg.record(),
                  **_ema_counters(st),
                  "mesh": [st.cfg.dp_replicate, st.cfg.dp_shard or 1, st.cfg.cp]}
        save_sharded(st.out / SHARDED_DIR, st.step, _dcp_state(st), extras, is_main=st.info.is_main,
                     before_rename=st.cfg.extra.get("before_rename"))
    else:
        state = {"format": 1, "step": st.step, "model": st.model.state_dict(), "ema": st.ema.state_dict(),
                 "opt": st.opt.state_dict(), "rng": rng, "losses": list(st.losses), "train_time": st.train_time,
                 "world_size": st.info.world_size, "args": st.cfg.record()}
        if st.eval_ema is not None:
            state["eval_ema"] = st.eval_ema.state_dict()
        if st.info.is_main:
            save_checkpoint(str(st.out / CHECKPOINT), state)
    st.last_good = st.step


def train(st: TrainState) -> None:
    """Steps from st.step to cfg.stop, checkpointing every --ckpt-every steps and at the end."""
    cfg = st.cfg
    teacher = st.ema.module if cfg.teacher == "ema" else None
    bar = None
    if st.info.is_main and not cfg.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=st.step, desc=f"{cfg.method}/{cfg.data}", dynamic_ncols=True)
    t0 = time.time()
    try:
        while st.step < cfg.stop:
            train_step(st, teacher)
            if bar is not None:
                bar.update(1)
                if st.step % 25 == 0 or st.step == cfg.steps:
                    bar.set_postfix(loss=f"{np.mean(st.losses[-25:]):.4f}")
            if st.step % cfg.ckpt_every == 0 or st.step == cfg.stop:
                st.train_time += time.time() - t0
                t0 = time.time()
                save(st)
    finally:
        if bar is not None:
            bar.close()


def _unsharded_copies(st: TrainState):
    """(model, evaluated EMA model: st.sampling_ema) as plain modules on rank 0 for sampling: the FSDP2
    modules' full state dicts (get_model_state_dict(full_state_dict=True), collective) loaded into fresh
    unsharded models; the modules themselves without FSDP2. Other ranks get (None, None)."""
    if not st.cfg.fsdp:
        return st.model, st.sampling_ema.module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = [get_model_state_dict(m, options=opts) for m in (st.model, st.sampling_ema.module)]
    if not st.info.is_main:
        return None, None
    nets = []
    for sd in full:
        net = build_network(st.cfg, st.ds, st.method)
        net.load_state_dict(sd)
        nets.append(net.to(st.device))
    nets[1].eval().requires_grad_(False)
    return tuple(nets)


def _compile_metrics(st: TrainState) -> dict:
    """--compile: the compile time (first compiled call of this process, tracing + compilation + that step)
    and the time per step without it; {} otherwise."""
    if st.compiled is None:
        return {"compile": "none"}
    c = st.compiled.compile_seconds or 0.0
    n = max(1, len(st.losses) - 1)
    return {"compile": st.cfg.compile, "compile_s": round(c, 3),
            "sec_per_step_after_compile": round(max(0.0, st.train_time - c) / n, 5)}


def finish(st: TrainState, t_start: float) -> dict:
    """After training: the replica check, and on rank 0 (full runs only) metrics, evaluation, metrics.json."""
    from .evaluate import evaluate
    cfg, method = st.cfg, st.method
    in_sync = params_in_sync(st.model) and all(params_in_sync(e.module) for _, e in st.emas)
    if cfg.stop < cfg.steps:
        return {}
    model, ema_model = _unsharded_copies(st) if not cfg.no_eval else (st.model, st.sampling_ema.module)
    if not st.info.is_main:
        return {}
    losses = st.losses
    metrics = {"method": cfg.method, "data": cfg.data, "steps": cfg.steps, "batch_per_rank": cfg.batch,
               "world_size": st.info.world_size, "ranks_in_sync": in_sync,
               "final_loss": losses[-1] if losses else None,
               "final_loss_mean100": float(np.mean(losses[-100:])) if losses else None,
               "train_time_s": round(st.train_time, 3),
               "sec_per_step": round(st.train_time / max(1, len(losses)), 5),
               **_compile_metrics(st),
               "nominal_fpe": method.NOMINAL_FPE, "calls": method.CALLS,
               "method_cfg": {k: v for k, v in {**method.DEFAULTS, **cfg.method_cfg}.items()
                              if k not in ("teacher", "generator", "step")},
               "teacher": cfg.teacher if "teacher" in method.DEFAULTS else None, "grad_clip": cfg.grad_clip,
               "lr": cfg.lr, "lr_schedule": cfg.lr_schedule, "ema_decay": cfg.ema_decay, "time_freq": cfg.time_freq,
               "params": sum(p.numel() for p in model.parameters()), "device": str(st.device),
               "backend": cfg.backend}
    if st.eval_ema is not None:  # the "ema" entries of the evaluation are this EMA's
        metrics["eval_ema_decay"] = cfg.eval_ema_decay
    if cfg.fsdp:
        metrics["parallel"] = {"dp_replicate": cfg.dp_replicate, "dp_shard": cfg.dp_shard, "cp": cfg.cp,
                               "mixed_precision": cfg.mixed_precision,
                               "reshard_after_forward": cfg.reshard_after_forward,
                               "activation_checkpointing": cfg.activation_checkpointing}
    if not cfg.no_eval:
        metrics.update(evaluate(method, st.ds, model, ema_model, cfg.out, cfg, st.device, losses))
    metrics["wall_time_s"] = round(time.time() - t_start, 3)
    import json
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns the metrics dict (rank 0 of a finished run) or {}."""
    t_start = time.time()
    st = setup(cfg)
    train(st)
    return finish(st, t_start)
