"""pytest-benchmark suite of the kernels: ``pytest benchmarks/ --benchmark-only`` (not part of ``pytest tests``,
whose testpaths is tests/). Runs on CUDA when present, else on the CPU; set FK_BENCH_DEVICE to force one."""
import os

import pytest
import torch


def bench_device() -> torch.device:
    want = os.environ.get("FK_BENCH_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def device():
    return bench_device()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
