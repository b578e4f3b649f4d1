"""Checkpoints that resume bit-for-bit.

Two formats, both holding model, EMA and optimizer state; the step; the loss history; the resolved flags;
and every RNG the loop uses (torch CPU, CUDA when present, numpy's global MT19937, python's random, the
data generator), per rank:

- ``checkpoint.pt`` (single-process and plain data-parallel runs): one file written by rank 0, loads with
  torch.load(weights_only=True); tensors or primitive containers only (numpy's key array as a tensor).
- sharded (FSDP2 runs, and any run resumed from one): a folder ``<root>/step-<N>/`` written with
  torch.distributed.checkpoint (every rank writes its shards of model, optimizer and EMA; ``extras.pt``
  holds the rest), loadable onto any world size, including a single process without a process group.
  Atomic: written into ``<root>/.tmp-step-<N>``, renamed to ``step-<N>`` once complete (``step-<N>.1``, ...
  when the same step is saved again, e.g. by a resumed run), then ``<root>/LATEST`` (the name of the newest
  complete folder) is replaced with os.replace, and only then are older folders removed; a run killed at any
  point leaves LATEST naming a complete checkpoint.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def rng_state(data_generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                     "pos": int(pos), "has_gauss": int(has_gauss),
                                                     "cached": float(cached)},
          "python": random.getstate(), "data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    data_generator.set_state(st["data"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (tmp file + os.replace) so a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def _not_a_checkpoint(path: str, err: Exception) -> str:
    """The --resume error for a file torch.load(weights_only=True) cannot read: what the file is not, with
    the path. torch's own message is left out on purpose: for a pickle it cannot load safely it suggests
    weights_only=False, which would run whatever code the file holds (the loop's checkpoints never need
    it); the original exception stays chained (``__cause__``)."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    why = "empty file" if empty else f"truncated, or not a torch file of tensors: {type(err).__name__}"
    return f"--resume: {path} is not a valid checkpoint ({why})"


CHECKPOINT_KEYS = ("step", "model", "ema", "opt", "rng", "losses", "train_time", "world_size", "args")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """A checkpoint.pt's dict; FileNotFoundError when absent, ValueError (naming the file) when it is
    empty, truncated, not a torch file or lacks the loop's keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated/garbage files raise many types (EOFError, RuntimeError, ...)
        raise ValueError(_not_a_checkpoint(path, e)) from e
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"--resume: {path} is not a checkpoint of this training loop (missing {missing})")
    _check_contents(ck, path)
    return ck


_RNG_KEYS = ("torch", "numpy", "python", "data")


def _check_contents(ck: dict, path) -> None:
    """The loop's own fields of a checkpoint (or sharded extras) of the kinds it wrote: a file with the right keys
    but other contents is a ValueError naming the file and the field (not a KeyError or TypeError later)."""
    def number(x, integer=False):
        return not isinstance(x, bool) and isinstance(x, int if integer else (int, float))
    checks = (("step", lambda v: number(v, True) and v >= 0, "an integer >= 0"),
              ("world_size", lambda v: number(v, True) and v >= 1, "an integer >= 1"),
              ("train_time", number, "a number"),
              ("losses", lambda v: isinstance(v, list) and all(map(number, v)), "a list of numbers"),
              ("args", lambda v: isinstance(v, dict), "a dict of flags"),
              ("rng", lambda v: isinstance(v, list) and all(isinstance(r, dict) and all(k in r for k in _RNG_KEYS)
                                                             for r in v), f"per-rank RNG states {list(_RNG_KEYS)}"),
              ("ema", lambda v: isinstance(v, dict) and number(v.get("num_updates"), True), "an EMA state"))
    for key, ok, expected in checks:
        if not ok(ck[key]):
            raise ValueError(f"--resume: {path} is not a checkpoint of this training loop ({key}: expected "
                             f"{expected}, got {type(ck[key]).__name__})")


# ---------------------------------------------------------------- sharded (torch.distributed.checkpoint)
LATEST = "LATEST"
EXTRAS = "extras.pt"


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def latest_sharded(root) -> "str | None":
    """The newest complete sharded checkpoint folder under ``root`` (named by root/LATEST), or None."""
    pointer = os.path.join(os.fspath(root), LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = f.read().strip()
    path = os.path.join(os.fspath(root), name)
    if not name or not os.path.isfile(os.path.join(path, EXTRAS)):
        raise ValueError(f"--resume: {pointer} names {name!r}, which is not a complete checkpoint folder")
    return path


def _free_name(root: str, base: str) -> str:
    """``base``, or ``base.1``, ``base.2``, ... when a folder of that name exists under ``root``."""
    name, n = base, 0
    while os.path.exists(os.path.join(root, name)):
        n += 1
        name = f"{base}.{n}"
    return name


def _broadcast_name(name: "str | None") -> str:
    """Rank 0's ``name`` on every rank (as it is without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    return name


def save_sharded(root, step: int, tensors: dict, extras: dict, *, is_main: bool, before_rename=None) -> str:
    """Collective (every rank calls it): write ``tensors`` (state dicts of DTensors / tensors, e.g.
    {"model": ..., "optim": ..., "ema": ...}) with torch.distributed.checkpoint and ``extras`` (rank 0,
    torch.save) into root/step-<step>, atomically (see the module docstring). ``before_rename``: a hook
    called on rank 0 after the data is written and before the folder is renamed (tests use it to
    simulate a crash mid-save). Returns the folder."""
    import shutil

    import torch.distributed.checkpoint as dcp
    root = os.fspath(root)
    base = f"step-{step:08d}"
    tmp = os.path.join(root, f".tmp-{base}")
    # the same step saved again (e.g. a resumed run's first save): a new folder name, so that the one LATEST
    # names stays complete until LATEST names the new one (every rank picks the same: rank 0 decides)
    name = _broadcast_name(_free_name(root, base) if is_main else None)
    final = os.path.join(root, name)
    if is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=tmp)
    if is_main:
        torch.save(extras, os.path.join(tmp, EXTRAS))
        if before_rename is not None:
            before_rename(tmp)
        os.replace(tmp, final)
        pointer = os.path.join(root, LATEST)
        with open(pointer + ".tmp", "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer + ".tmp", pointer)
        for old in os.listdir(root):
            if old != name and (old.startswith("step-") or old.startswith(".tmp-step-")):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final


def load_sharded_extras(path) -> dict:
    """The extras.pt of a sharded checkpoint folder (step, losses, RNG states, EMA counters, flags)."""
    f = os.path.join(os.fspath(path), EXTRAS)
    try:
        ex = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(_not_a_checkpoint(f, e)) from e
    missing = [k for k in ("step", "losses", "rng", "train_time", "world_size", "args", "ema")
               if not isinstance(ex, dict) or k not in ex]
    if missing:
        raise ValueError(f"--resume: {f} is not a checkpoint of this training loop (missing {missing})")
    _check_contents(ex, f)
    return ex


def load_sharded(path, tensors: dict) -> None:
    """Collective: fill ``tensors`` (the same structure save_sharded wrote, for this run's sharding) in
    place from the folder; resharding to another world size is done by torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp
    try:
        dcp.load(tensors, checkpoint_id=os.fspath(path))
    except Exception as e:  # noqa: BLE001 - DCP wraps shape/key mismatches in CheckpointException
        raise ValueError(f"--resume: {path} does not fit this model ({type(e).__name__}: {str(e)[:300]})") from e
