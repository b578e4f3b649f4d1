"""Waiting for a group of processes started by ``torch.multiprocessing.spawn(..., join=False)`` with a deadline:
the one join-with-timeout of the package's multi-process benchmarks and tests."""
from __future__ import annotations

import time


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
