"""Waiting for a group of processes started by ``torch.multiprocessing.spawn(..., join=False)`` with a deadline,
and leaving a process group: the one join-with-timeout and the one teardown of the package's multi-process
code, benchmarks and tests."""
from __future__ import annotations

import gc
import time


def leave_process_group(barrier: bool = True) -> None:
    """Destroy the default process group, first freeing the objects in reference cycles that still hold its
    work (FSDP-sharded modules and their hooks, device meshes). Left to interpreter shutdown, a gloo work
    object's destructor takes the GIL while the interpreter is finalised and the rank aborts ("terminate
    called without an active exception"), failing the whole job. ``barrier``: wait for every rank first, so
    that no rank tears its gloo pairs down while a peer still reads from them (the normal end); leave it out
    on an error path, where another rank may never arrive."""
    import torch.distributed as dist
    gc.collect()
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


def join_within(ctx, timeout: float, what: str) -> None:
    """Join every process of the spawn context ``ctx``; a rank that failed raises (torch's
    ProcessRaisedException / ProcessExitedException, the others terminated), ranks still running after
    ``timeout`` seconds are killed and TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{what}: {len(ctx.processes)} processes did not finish within {timeout} s")
