"""flowmap_kernels.data, .metrics and .sampling against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flowmap_kernels import sampling
from flowmap_kernels.data import DATASETS, get_dataset
from flowmap_kernels.methods import METHODS
from flowmap_kernels.metrics import frechet_distance, sliced_wasserstein


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_datasets_shapes_ranges_and_determinism(name):
    ds = get_dataset(name)
    a, ya = ds.sample(300, generator=torch.Generator().manual_seed(3), with_labels=True)
    b = ds.sample(300, generator=torch.Generator().manual_seed(3))
    assert a.shape == (300, *ds.shape) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.isfinite(a).all()
    if name == "checkerboard":  # the 8 black squares of a 4x4 board on [-2, 2]^2
        assert a.abs().max() <= 2
        assert ((torch.floor(a[:, 0]) + torch.floor(a[:, 1])) % 2 == 0).all()
    if name == "digits":
        assert a.min() >= -1 and a.max() <= 1 and ya.max() <= 9
        from sklearn.datasets import load_digits
        imgs = torch.tensor(load_digits().images, dtype=torch.float32) / 8 - 1
        assert all((imgs == x[0]).all(dim=(1, 2)).any() for x in a[:20])


def test_unknown_dataset_and_bad_n():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*checkerboard"):
        get_dataset("mnist")
    with pytest.raises(ValueError, match="n: expected a positive int"):
        get_dataset("moons").sample(0)


def test_swd_matches_scipy_per_projection_and_properties():
    from scipy.stats import wasserstein_distance
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 2)), rng.normal(loc=1.0, size=(500, 2))
    w = np.random.default_rng(4).standard_normal((2, 16))
    w /= np.linalg.norm(w, axis=0)
    ref = np.mean([wasserstein_distance(a @ w[:, i], b @ w[:, i]) for i in range(16)])
    assert abs(sliced_wasserstein(a, b, n_projections=16, seed=4) - ref) < 1e-12
    assert sliced_wasserstein(a, a) == 0.0
    # a pure shift by m: every projection moves by <m, w>, so SWD = |m| E|w_1| = |m| * 2/pi in 2D
    big = rng.normal(size=(1000, 2))
    m = np.array([0.3, -0.4])
    assert abs(sliced_wasserstein(big + m, big, n_projections=4000) - 0.5 * 2 / np.pi) < 1e-2
    assert sliced_wasserstein(a, b[:300]) > 0  # different sizes are allowed
    with pytest.raises(ValueError, match="feature sizes"):
        sliced_wasserstein(a, np.zeros((10, 3)))


def test_frechet_distance_closed_form_and_numpy_fallback(monkeypatch):
    rng = np.random.default_rng(1)
    n = 200_000
    a = rng.normal(size=(n, 3)) * np.array([1.0, 2.0, 0.5])
    b = rng.normal(size=(n, 3)) * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    # diagonal Gaussians: |mu|^2 + sum (sa - sb)^2
    exact = 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    fd = frechet_distance(a, b)
    assert abs(fd - exact) < 0.05
    import builtins
    real_import = builtins.__import__

    def no_scipy(name, *args, **kw):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert abs(frechet_distance(a, b) - fd) < 1e-8
    assert abs(frechet_distance(a, a)) < 1e-8


class ExactPointFlowMap(torch.nn.Module):
    """The exact average velocity when all data sits at c: V(x, s, t) = (x - c) / s for every t."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, s, t, y=None):
        return (x - self.c) / s.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("kind", ["flowmap", "euler", "consistency"])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_samplers_reach_the_data_with_the_exact_flow_map(kind, steps):
    c = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    noise = torch.randn(50, 2, dtype=torch.float64)
    x = sampling.SAMPLERS[kind](ExactPointFlowMap(c), noise, steps, chunk=16)
    assert torch.allclose(x, c.expand_as(x), atol=1e-12)


def test_flowmap_sampler_step_structure():
    """Records the (s, t) pairs: a uniform grid from 1 to 0; Euler uses t = s; consistency t = 0."""
    seen = []

    class Rec(torch.nn.Module):
        def forward(self, x, s, t, y=None):
            seen.append((float(s[0]), float(t[0])))
            return torch.zeros_like(x)
    noise = torch.randn(3, 2)
    sampling.flowmap_sample(Rec(), noise, 4)
    assert seen == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    seen.clear()
    sampling.euler_sample(Rec(), noise, 2)
    assert seen == [(1.0, 1.0), (0.5, 0.5)]
    seen.clear()
    sampling.consistency_sample(Rec(), noise, 2)
    assert seen == [(1.0, 0.0), (0.5, 0.0)]
    assert sampling.sample(METHODS["scm"], Rec(), noise, 1).shape == noise.shape
    with pytest.raises(ValueError, match="steps"):
        sampling.flowmap_sample(Rec(), noise, 0)
