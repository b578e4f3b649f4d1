"""One intra-op thread for the bench tests: tiny models on a shared 2-core machine run 10-30x slower with
two OpenMP threads competing with other processes."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
