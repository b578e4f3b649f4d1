"""Communication for context parallelism: process-group helpers, counted collectives, sequence layouts.

Every byte that context-parallel attention sends goes through the wrappers here, which add it to the
active :func:`count_communication` counters under a kind:

``"ring"``        K/V (and tK/tV) blocks passed to the next rank of the ring
``"ring_grad"``   dK/dV (and dtK/dtV) accumulators passed around the ring in the backward
``"all_to_all"``  Ulysses re-sharding (sequence <-> heads), including masks
``"all_gather"``  ``gather_sequence`` forward
``"reduce_scatter"`` ``gather_sequence`` backward
``"metadata"``    the per-call exchange of local sequence lengths (a few int64 per rank)

"Bytes sent" is the data that leaves this rank for other ranks (the piece a rank keeps for itself is not
counted), whatever algorithm the backend uses underneath.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

_COUNTERS: list["CommCounter"] = []


class CommCounter:
    """Bytes sent by this rank, by kind (see the module docstring), while the counter is active."""

    def __init__(self):
        self.bytes_sent: Counter = Counter()
        self.messages: Counter = Counter()

    def total(self, exclude: Sequence[str] = ("metadata",)) -> int:
        """All bytes sent except the listed kinds."""
        return sum(v for k, v in self.bytes_sent.items() if k not in exclude)


@contextlib.contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Context manager yielding a :class:`CommCounter` that records this rank's sends inside the block."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _record(kind: str, nbytes: int) -> None:
    for c in _COUNTERS:
        c.bytes_sent[kind] += int(nbytes)
        c.messages[kind] += 1


def nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


# ----------------------------------------------------------------------------------------------- groups

def check_group(group) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (context parallelism needs a process group)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        if group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("group: this rank is not a member of the group (torch.distributed.new_group gave it "
                             "GroupMember.NON_GROUP_MEMBER); only the group's ranks may call")
        raise TypeError(f"group: expected a torch.distributed.ProcessGroup or None, got {type(group).__name__}")


def check_load_balance(load_balance) -> bool:
    """``load_balance`` must be a bool (a string such as "no" would read as True)."""
    if not isinstance(load_balance, bool):
        raise TypeError(f"load_balance: expected a bool, got {type(load_balance).__name__} {load_balance!r}")
    return load_balance


def world_and_rank(group) -> tuple[int, int]:
    """(size of ``group``, this process's rank in it); ``group=None`` is the default group."""
    check_group(group)
    return dist.get_world_size(group), dist.get_rank(group)


def _global_rank(group, rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


# ---------------------------------------------------------------------------------------------- layouts

@dataclass(frozen=True)
class SequenceLayout:
    """How a sequence of ``total`` tokens is split over ``world`` ranks.

    Without load balancing rank r holds chunk r of ``torch.tensor_split(x, world)``; with it, the sequence
    is cut into 2 * world chunks (tensor_split semantics) and rank r holds chunks r and 2 world - 1 - r,
    concatenated (so that under causal attention every rank has the same amount of work).
    """

    total: int
    world: int
    load_balance: bool = False

    def _chunk(self, c: int) -> tuple[int, int]:
        n = 2 * self.world if self.load_balance else self.world
        base, extra = divmod(self.total, n)
        return c * base + min(c, extra), base + (1 if c < extra else 0)

    def segments(self, rank: int) -> tuple[tuple[int, int], ...]:
        """This rank's (global start, length) pieces, in local order."""
        if self.load_balance:
            return self._chunk(rank), self._chunk(2 * self.world - 1 - rank)
        return (self._chunk(rank),)

    def local_length(self, rank: int) -> int:
        return sum(n for _, n in self.segments(rank))

    def local_pieces(self, rank: int) -> list[tuple[int, int, int]]:
        """(local start, global start, length) of each non-empty segment of ``rank``."""
        out, off = [], 0
        for g0, n in self.segments(rank):
            if n:
                out.append((off, g0, n))
            off += n
        return out


def metadata_device(group, like=None) -> torch.device:
    """Where a small exchange of int64 can go through ``group``: the CPU when its backend serves CPU tensors
    (gloo, mpi, ucc, or a per-device map such as "cpu:gloo,cuda:nccl"), else (NCCL serves CUDA tensors only)
    the device of ``like`` (the call's data: a tensor or a device; anything else, such as a bad argument, counts
    as none) when it is of the backend's kind, or this rank's current one."""
    like = getattr(like, "device", like)
    backend = str(dist.get_backend(group))
    if ":" in backend:
        kinds = [part.split(":")[0].strip() for part in backend.split(",")]
    else:
        kinds = dist.Backend.backend_capability.get(backend.lower(), ["cpu"])
    if "cpu" in kinds:
        return torch.device("cpu")
    if isinstance(like, torch.device) and like.type == kinds[0]:
        return like
    return torch.device(kinds[0], getattr(torch, kinds[0]).current_device())


def all_gather_lengths(lengths: Sequence[int], group, world: int, like=None) -> list[list[int]]:
    """Every rank's list of local lengths (one small all_gather of int64 on :func:`metadata_device`), counted as
    "metadata"."""
    with torch._C._DisableFuncTorch():  # plain tensors even inside torch.func transforms (checkpointed blocks)
        mine = torch.tensor(list(lengths), dtype=torch.int64, device=metadata_device(group, like))
        out = [torch.empty_like(mine) for _ in range(world)]
        _record("metadata", nbytes(mine) * (world - 1))
        dist.all_gather(out, mine, group=group)
        return [t.tolist() for t in out]


def exchange_checked(what: str, check: Callable[[], Sequence[int]], size: int, group, world: int,
                     like=None) -> list[list[int]]:
    """Every rank's record of its call: ``check()`` runs this rank's argument checks and returns its record (``size``
    ints), exchanged in one small all-gather ("metadata"). A check that fails (TypeError / ValueError) is raised
    after the exchange, and the other ranks raise a ValueError naming the failed ranks: an error on one rank stops
    every rank, none waits in a later collective for it. ``like``: the call's data (a tensor), its device or None,
    see :func:`metadata_device`."""
    error, row = None, [0] * (size + 1)
    try:
        record = [int(n) for n in check()]
        if len(record) != size:
            raise AssertionError(f"{what}: a call record of {len(record)} values, expected {size}")
        row = [1] + record
    except (TypeError, ValueError) as e:
        error = e
    rows = all_gather_lengths(row, group, world, like)
    if error is not None:
        raise error
    failed = [r for r, row in enumerate(rows) if not row[0]]
    if failed:
        raise ValueError(f"{what}: rank(s) {failed} of the group rejected their arguments (their error names the "
                         f"argument); every rank stops")
    return [row[1:] for row in rows]


def layout_from_lengths(name: str, lengths: Sequence[int], world: int, load_balance: bool) -> SequenceLayout:
    """The layout whose rank r holds ``lengths[r]`` tokens; ValueError naming ``name`` when the shards
    are not what :func:`shard_sequence` would produce."""
    layout = SequenceLayout(int(sum(lengths)), world, load_balance)
    expected = [layout.local_length(r) for r in range(world)]
    if list(lengths) != expected:
        how = "chunks r and 2W-1-r of 2W" if load_balance else "chunk r of W"
        raise ValueError(f"{name}: local sequence lengths over the ranks are {list(lengths)}; for {layout.total} "
                         f"tokens sharded as by shard_sequence(load_balance={load_balance}) ({how}, tensor_split "
                         f"sizes) they would be {expected}")
    return layout


# ------------------------------------------------------------------------------------------ collectives

def all_to_all(send: list[torch.Tensor], recv_shapes: list[tuple], dtype, group, kind: str) -> list[torch.Tensor]:
    """send[j] goes to rank j; returns the W tensors received (recv_shapes[i] from rank i)."""
    world, rank = world_and_rank(group)
    send = [s.contiguous() for s in send]
    device = send[rank].device
    _record(kind, sum(nbytes(s) for j, s in enumerate(send) if j != rank))
    if world == 1:
        return [send[0].reshape(recv_shapes[0])]
    # one flat buffer each way: all_to_all_single takes unequal split sizes (gloo's list form does not)
    in_sizes = [s.numel() for s in send]
    out_sizes = [int(torch.Size(shape).numel()) for shape in recv_shapes]
    flat_in = torch.cat([s.reshape(-1) for s in send])
    flat_out = torch.empty(sum(out_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(flat_out, flat_in, out_sizes, in_sizes, group=group)
    return [piece.view(shape) for piece, shape in zip(flat_out.split(out_sizes), recv_shapes)]


class RingExchange:
    """Send tensors to the next rank of the ring and receive same-dtype tensors of the given shapes from the
    previous one, asynchronously; ``wait()`` returns the received tensors."""

    def __init__(self, send: list[torch.Tensor], recv_shapes: list[tuple], group, kind: str, tag: int = 0):
        world, rank = world_and_rank(group)
        nxt, prv = _global_rank(group, (rank + 1) % world), _global_rank(group, (rank - 1) % world)
        self.recv = [torch.empty(shape, dtype=s.dtype, device=s.device) for s, shape in zip(send, recv_shapes)]
        self._send = [s.contiguous() for s in send]  # kept alive until wait()
        _record(kind, sum(nbytes(s) for s in self._send))
        ops = [dist.P2POp(dist.isend, s, nxt, group, tag) for s in self._send]
        ops += [dist.P2POp(dist.irecv, r, prv, group, tag) for r in self.recv]
        self._works = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        for w in self._works:
            w.wait()
        self._send = None
        return self.recv
