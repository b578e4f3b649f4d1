"""Run a function on W gloo processes from inside pytest and bring the results back.

The one process-spawn helper of the multi-process tests (tests/distributed and tests/training).
``spawn(fn, world, tmp_path, *args)`` starts ``world`` processes (torch.multiprocessing, start method
spawn) and runs ``fn(rank, world, *args)`` on each with one intra-op thread:

* ``group=True`` (default): each rank first joins a gloo group through a file store in ``tmp_path``
  (destroyed after ``fn``);
* ``group=False``: no group is created; MASTER_ADDR / MASTER_PORT (a free port) / RANK / WORLD_SIZE /
  LOCAL_RANK are set as torchrun sets them, for code that initialises the process group itself.

Rank 0's return value is returned, or the list of every rank's with ``all_ranks=True`` (by value: each
rank saves it with torch.save into ``tmp_path``). An exception on any rank fails the call with that
rank's traceback; ranks still running after ``timeout`` seconds are killed and the call fails.
``tmp_path=None`` uses a temporary directory.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flowmap_kernels.distributed.processes import join_within, leave_process_group


def _entry(rank, world, store, out, fn, args, group, port, all_ranks):
    torch.set_num_threads(1)
    keep = all_ranks or rank == 0
    if not group:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        result = fn(rank, world, *args)
        if keep:
            torch.save(result, f"{out}.{rank}")
        return
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()
        if keep:
            torch.save(result, f"{out}.{rank}")
    finally:
        leave_process_group(barrier=False)  # (the normal path passed its barrier above)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, tmp_path, *args, timeout: float = 600.0, group: bool = True, all_ranks: bool = False):
    if tmp_path is None:
        with tempfile.TemporaryDirectory() as tmp:
            return spawn(fn, world, tmp, *args, timeout=timeout, group=group, all_ranks=all_ranks)
    store, out = os.path.join(str(tmp_path), f"store{world}"), os.path.join(str(tmp_path), f"result{world}.pt")
    env = dict(OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = mp.spawn(_entry, args=(world, store, out, fn, args, group, None if group else _free_port(), all_ranks),
                       nprocs=world, join=False)
        join_within(ctx, timeout, "spawn")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results = [torch.load(f"{out}.{r}", weights_only=False) for r in (range(world) if all_ranks else [0])]
    return results if all_ranks else results[0]
