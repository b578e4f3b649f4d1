"""Run a function on W gloo processes from inside pytest and bring rank 0's result back.

``spawn(fn, world, tmp_path, *args)`` starts ``world`` processes (torch.multiprocessing, start method
spawn), each joins a gloo group through a file store in ``tmp_path``, runs ``fn(rank, world, *args)`` with
one intra-op thread, and rank 0's return value is returned (an exception on any rank fails the call
with that rank's traceback; ranks still running after ``timeout`` seconds are killed and the call fails).
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, store, out, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        dist.barrier()
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, tmp_path, *args, timeout: float = 600.0):
    store, out = os.path.join(str(tmp_path), f"store{world}"), os.path.join(str(tmp_path), f"result{world}.pt")
    env = dict(OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = mp.spawn(_entry, args=(world, store, out, fn, args), nprocs=world, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    if proc.is_alive():
                        proc.kill()
                raise TimeoutError(f"spawn: {world} processes did not finish within {timeout} s")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return torch.load(out, weights_only=False)
