"""Where the context-parallel metadata exchange puts its int64 record: a device the group's backend serves.

Before, it was always a CPU tensor, which an NCCL-only group (``init_process_group("nccl")``, the usual GPU setup)
refuses: every context-parallel call would have failed at its first exchange on GPUs. No GPU here: the backend
is named through a patched ``dist.get_backend``.
"""
from __future__ import annotations

import pytest
import torch

from flowmap_kernels.distributed import comm


@pytest.mark.parametrize("backend, expected", [
    ("gloo", "cpu"), ("mpi", "cpu"), ("ucc", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("cuda:nccl,cpu:gloo", "cpu"),
    ("nccl", "cuda:3"), ("xccl", "xpu:3")])
def test_metadata_device_is_one_the_backend_serves(backend, expected, monkeypatch):
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "current_device", lambda: 3)
    elif backend == "xccl":
        pytest.skip("this torch has no torch.xpu")
    assert comm.metadata_device(None) == torch.device(expected)


@pytest.mark.parametrize("backend, like, expected", [
    ("nccl", torch.device("cuda", 1), "cuda:1"), ("nccl", torch.device("cpu"), "cuda:3"), ("nccl", None, "cuda:3"),
    ("gloo", torch.device("cuda", 1), "cpu"), ("nccl", torch.empty(0, device="meta"), "cuda:3"),
    ("nccl", "not a tensor", "cuda:3")])
def test_metadata_device_follows_the_data_where_the_backend_needs_a_gpu(backend, like, expected, monkeypatch):
    """A rank whose data lives on cuda:1 exchanges there, not on the current device (which may be cuda:0 on
    every rank of a node when the script never called torch.cuda.set_device)."""
    monkeypatch.setattr(comm.dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert comm.metadata_device(None, like) == torch.device(expected)
