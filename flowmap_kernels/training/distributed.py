"""Data parallelism without DistributedDataParallel.

torch.func.jvp cannot take a DDP wrapper, and differentiating the inner module skips DDP's gradient
synchronisation silently. So the loop keeps the plain module, broadcasts rank 0's
parameters at the start, and after every backward averages the gradients itself with bucketed,
flattened all_reduce calls (every method, every parameter; a missing grad counts as zero). That path stays
because it keeps full, identical parameters on every rank, a single-file checkpoint.pt, and the
default torchrun runs bit-identical to earlier versions. Launch with torchrun (gloo on CPU, NCCL on CUDA);
without WORLD_SIZE > 1 everything is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


_owned_group: list = []  # the default group, when init_distributed created it


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, single_process_group: bool = False) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (backend: nccl for cuda, gloo for cpu).

    ``single_process_group``: without torchrun, create a one-rank group (an in-memory store), which
    FSDP2 and its device mesh need (``--dp-shard 1`` in a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if single_process_group and not dist.is_initialized():
            if device == "cuda":
                torch.cuda.set_device(0)
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
            _owned_group.append(dist.group.WORLD)
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        _owned_group.append(dist.group.WORLD)
    return DistInfo(rank, world, local)


def close_distributed(barrier: bool = True) -> None:
    """Leave the process group that init_distributed created (a caller's own group is left alone).

    ``barrier``: wait for every rank first (the normal end of a run); leave it out on an error path,
    where another rank may never arrive. A gloo rank that exits with its process group alive can abort
    at interpreter shutdown ("terminate called without an active exception") and take the whole
    torchrun job down with it."""
    if not _owned_group:
        return
    _owned_group.clear()
    if dist.is_initialized():
        from ..distributed.processes import leave_process_group
        leave_process_group(barrier)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank src's parameters and buffers to every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def allreduce_grads(params, world_size: int, bucket_bytes: int = 25 * 2 ** 20) -> int:
    """Average .grad over ranks in place (missing grads become zeros). Returns the number of all_reduce
    calls (buckets of at most bucket_bytes, grouped by dtype and device)."""
    if world_size <= 1:
        return 0
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    groups: dict = {}
    for p in params:
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    calls = 0
    for grads in groups.values():
        bucket, size = [], 0
        for g in grads + [None]:
            if g is not None:
                bucket.append(g)
                size += g.numel() * g.element_size()
            if bucket and (g is None or size >= bucket_bytes):
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                flat /= world_size
                for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(src)
                calls += 1
                bucket, size = [], 0
    return calls


def params_in_sync(module: torch.nn.Module) -> bool:
    """True when every rank holds bitwise the same parameters as rank 0 (True when not distributed).
    Sharded (DTensor) parameters are compared as full tensors (collective): under HSDP this catches
    replicas that diverged; under plain FSDP the full tensors agree by construction."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        flat = torch.cat([(p.full_tensor() if isinstance(p, DTensor) else p).detach().reshape(-1).float()
                          for p in module.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([1 if torch.equal(flat, ref) else 0], device=flat.device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
