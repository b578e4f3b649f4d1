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


class GaussianVelocity(torch.nn.Module):
    """The exact velocity of N(0, sig^2) data, V(x, s, s) = x (s - (1 - s) sig^2) / ((1 - s)^2 sig^2 + s^2),
    evaluated in float64 and returned in x's dtype (for the Euler sampler)."""

    def __init__(self, sig=0.3):
        super().__init__()
        self.sig = sig

    def forward(self, x, s, t, y=None):
        s = s.double().reshape(-1, *([1] * (x.dim() - 1)))
        return (x.double() * (s - (1 - s) * self.sig ** 2) / ((1 - s) ** 2 * self.sig ** 2 + s ** 2)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("steps", [100, 1000])
def test_sixteen_bit_noise_samples_like_float32(dtype, steps):
    """A 16-bit time grid and state: bfloat16 rounded 1000 grid times to about 500 distinct ones and dropped
    every update below its resolution (1000 Euler steps: std 0.39 for 0.30). The state and the grid are
    float32 now, the model still gets inputs in the noise's dtype, and the result is in it."""
    noise = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    ref = sampling.euler_sample(GaussianVelocity(), noise, steps)
    seen = []

    class Spy(GaussianVelocity):
        def forward(self, x, s, t, y=None):
            seen.append((x.dtype, s.dtype, t.dtype))
            return super().forward(x, s, t, y)
    x = sampling.euler_sample(Spy(), noise.to(dtype), steps)
    assert x.dtype == dtype and set(seen) == {(dtype, dtype, dtype)}
    assert abs(float(x.double().std()) - float(ref.std())) < 3e-3, (float(x.double().std()), float(ref.std()))
    assert (x.double() - ref.double()).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["flowmap", "euler", "consistency"])
def test_sampler_arguments(kind):
    f = sampling.SAMPLERS[kind]
    m = ExactPointFlowMap(torch.tensor([[0.3, -1.2]]))
    assert f(m, torch.randn(0, 2), 3).shape == (0, 2)  # an empty batch (torch.cat of nothing failed)
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        f(m, torch.randn(2, 2), True)
    with pytest.raises(ValueError, match="guidance_scale: expected a number"):
        sampling.guided(m, float("inf"))
    with pytest.raises(ValueError, match="guidance_interval: expected"):
        sampling.guided(m, 2.0, interval=(0.0, 0.5, 1.0))


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


# ----------------------------------------------------------------- stricter 2D metrics, class accuracy

def test_floor_corrected_swd_is_one_for_data_and_larger_off_data():
    from flowmap_kernels.metrics import floor_corrected_swd
    ds = get_dataset("checkerboard")
    refs = [ds.sample(3000, generator=torch.Generator().manual_seed(i)).numpy() for i in range(4)]
    same = floor_corrected_swd(ds.sample(3000, generator=torch.Generator().manual_seed(9)).numpy(), refs,
                               n_projections=256)
    assert len(same["ratios"]) == 4 and same["min"] <= same["mean"] <= same["max"]
    assert 0.5 < same["mean"] < 2.0  # data is as far from data as data is
    # the floor: the mean SWD over the 6 pairs of references; ratio k = SWD(samples, ref_k) / floor
    assert len(same["floor_pairs"]) == 6
    assert abs(same["floor_pairs"][5] - sliced_wasserstein(refs[2], refs[3], 256)) < 1e-15  # pairs in (i, j) order
    assert abs(same["floor"] - np.mean(same["floor_pairs"])) < 1e-15
    assert abs(same["ratios"][2] - same["swd"][2] / same["floor"]) < 1e-15
    noise = floor_corrected_swd(np.random.default_rng(0).normal(size=(3000, 2)), refs, n_projections=256)
    assert noise["min"] > 3 * same["max"]
    with pytest.raises(ValueError, match="refs: expected at least 2"):
        floor_corrected_swd(refs[0], refs[:1])


def test_mmd_rbf_closed_form_and_sharpness():
    from flowmap_kernels.metrics import mmd_rbf
    h, d = 0.1, 0.15
    a, b = np.zeros((50, 2)), np.tile([[d, 0.0]], (50, 1))
    # point masses: k(a, a) = k(b, b) = 1, k(a, b) = exp(-d^2 / 2h^2)
    assert abs(mmd_rbf(a, b, bandwidth=h) - (2 - 2 * np.exp(-d ** 2 / (2 * h ** 2)))) < 1e-12
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(1500, 2)), rng.normal(size=(1500, 2))
    assert abs(mmd_rbf(x, y, bandwidth=0.3)) < 5e-3  # unbiased: about 0 for one distribution
    # a blurred checkerboard (half a cell of noise) vs the data: SWD barely moves, the small-bandwidth MMD does
    ds = get_dataset("checkerboard")
    ref = ds.sample(2000, generator=torch.Generator().manual_seed(0)).numpy()
    data = ds.sample(2000, generator=torch.Generator().manual_seed(1)).numpy()
    blur = data + rng.normal(scale=0.3, size=data.shape)
    # measured: SWD 0.030 -> 0.051 (1.7x); MMD(h = 0.05) -4e-5 -> 5.0e-4 (13x the data-vs-data value)
    assert sliced_wasserstein(blur, ref) < 2 * sliced_wasserstein(data, ref)
    assert mmd_rbf(blur, ref, bandwidth=0.05) > 8 * abs(mmd_rbf(data, ref, bandwidth=0.05))
    with pytest.raises(ValueError, match="bandwidth"):
        mmd_rbf(x, y, bandwidth=0)


def test_in_support_fraction_on_known_cases():
    from flowmap_kernels.metrics import in_support_fraction
    g = lambda i: torch.Generator().manual_seed(i)
    assert in_support_fraction(get_dataset("checkerboard").sample(5000, generator=g(0)).numpy(), "checkerboard") == 1.0
    u = np.random.default_rng(0).uniform(-2, 2, size=(200_000, 2))
    assert abs(in_support_fraction(u, "checkerboard") - 0.5) < 5e-3  # 8 of the 16 cells
    # margin: a point 0.1 right of the square [0, 1) x [0, 1)
    assert in_support_fraction(np.array([[1.1, 0.5], [1.1, 0.5]]), "checkerboard", margin=0.11) == 1.0
    assert in_support_fraction(np.array([[1.1, 0.5], [np.nan, 0.0]]), "checkerboard", margin=0.09) == 0.0
    eg = in_support_fraction(get_dataset("eight_gaussians").sample(50_000, generator=g(1)).numpy(), "eight_gaussians")
    assert abs(eg - (1 - np.exp(-4.5))) < 3e-3  # within 3 std of a 2D Gaussian's centre
    assert in_support_fraction(np.zeros((10, 2)), "eight_gaussians") == 0.0
    mo = in_support_fraction(get_dataset("moons").sample(20_000, generator=g(2)).numpy(), "moons")
    assert mo > 0.99
    assert in_support_fraction(np.array([[0.0, 0.0], [0.0, -0.4]]), "moons") < 1.0
    with pytest.raises(ValueError, match="data: expected one of"):
        in_support_fraction(u, "digits")


@pytest.mark.parametrize("name", ["eight_gaussians", "moons"])
def test_class_accuracy_of_labelled_data(name):
    from flowmap_kernels.metrics import class_accuracy, nearest_class
    ds = get_dataset(name)
    x, y = ds.sample(20_000, generator=torch.Generator().manual_seed(0), with_labels=True)
    acc = class_accuracy(x.numpy(), y.numpy(), name)
    assert set(acc["per_class"]) == set(range(ds.num_classes))
    assert acc["accuracy"] > (0.9999 if name == "eight_gaussians" else 0.995)
    wrong = class_accuracy(x.numpy(), ((y + 1) % ds.num_classes).numpy(), name)
    assert wrong["accuracy"] < 0.01
    if name == "eight_gaussians":  # centre k at angle k * 45 degrees
        pts = 2.0 * np.stack([np.cos(np.arange(8) * np.pi / 4), np.sin(np.arange(8) * np.pi / 4)], 1)
        assert (nearest_class(pts, name) == np.arange(8)).all()
    else:  # the top of the upper arc and the bottom of the lower arc, in data coordinates
        pts = (np.array([[0.0, 1.0], [1.0, -0.5]]) - [0.5, 0.25]) * 2
        assert (nearest_class(pts, name) == [0, 1]).all()
    with pytest.raises(ValueError, match="labels: expected"):
        class_accuracy(x.numpy(), y[:5].numpy(), name)


# --------------------------------------------------------------------------------------- guided sampling

class _Lin(torch.nn.Module):
    """V = a_y x with a per-label scale; label 2 is the null class; an optional guidance input w."""

    num_classes, null_label = 2, 2

    def __init__(self, guidance_dim=0):
        super().__init__()
        self.guidance_dim = guidance_dim
        self.seen_w = []

    def forward(self, x, s, t, y=None, w=None):
        a = torch.tensor([1.0, 2.0, 0.5], dtype=x.dtype)[y]
        if w is not None:
            self.seen_w.append(w.clone())
            a = a * (w if w.dim() == 1 else w[:, 0])
        return a[:, None] * x


def test_guided_sampling_modes_and_interval():
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1])
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)[y][:, None]
    s = torch.full((6,), 0.6, dtype=torch.float64)
    m = _Lin()
    cfg = sampling.guided(m, 3.0)(x, s, s, y=y)
    assert torch.allclose(cfg, 0.5 * x + 3.0 * (a * x - 0.5 * x))  # V_null + w (V_c - V_null)
    assert torch.allclose(sampling.guided(m, 0.0)(x, s, s, y=y), 0.5 * x)  # w = 0: unconditional
    assert sampling.guided(m, 1.0) is m and sampling.guided(m, None) is m
    off = sampling.guided(m, 3.0, interval=(0.0, 0.5))(x, s, s, y=y)  # s = 0.6 outside: no guidance
    assert torch.allclose(off, a * x)
    mi = _Lin(guidance_dim=1)
    assert torch.allclose(sampling.guided(mi, 3.0, "input")(x, s, s, y=y), 3.0 * a * x)
    assert torch.allclose(sampling.guided(mi, 3.0, "scaled_input")(x, s, s, y=y), 9.0 * a * x)
    m3 = _Lin(guidance_dim=3)
    sampling.guided(m3, 2.0, "input", interval=(0.1, 0.7))(x, s, s, y=y)
    assert torch.allclose(m3.seen_w[-1], torch.tensor([[2.0, 0.1, 0.7]], dtype=torch.float64).expand(6, 3))
    with pytest.raises(ValueError, match="guidance: 'input' needs a model with a guidance input"):
        sampling.guided(m, 2.0, "input")
    with pytest.raises(ValueError, match="guidance_scale: expected a number > 0"):
        sampling.guided(mi, 0.0, "input")
    with pytest.raises(ValueError, match="cond: guided sampling needs labels"):
        sampling.guided(m, 2.0)(x, s, s)
    # through a sampler: one flow-map step of the guided field from s = 1 to 0
    out = sampling.flowmap_sample(m, x, 1, cond=y, guidance_scale=3.0)
    assert torch.allclose(out, x - (0.5 * x + 3.0 * (a * x - 0.5 * x)))
    # sample() takes the method's GUIDANCE: TVM scales the output by w
    out = sampling.sample(METHODS["tvm"], mi, x, 1, cond=y, guidance_scale=2.0)
    assert torch.allclose(out, x - 4.0 * a * x)


def test_cfg_sampling_changes_class_fidelity_after_short_training():
    """Conditional moons, MeanFlow with 20% label dropout, 300 steps: at 1, 2 and 4 steps the
    unconditional samples (w = 0) sit at chance, the conditional ones (w = 1) mostly in their class,
    and guidance w = 2 raises the per-class fidelity further (measured: 0.52 / 0.90-0.96 / 0.99-1.00)."""
    from flowmap_kernels.metrics import class_accuracy
    from flowmap_kernels.models import MLPFlowMap
    torch.manual_seed(0)
    ds = get_dataset("moons")
    model = MLPFlowMap((2,), hidden=64, depth=2, emb_dim=32, num_classes=2, null_class=True, max_freq=12.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    cfg = dict(cfg_dropout=0.2, time_dist="uniform", ratio_neq=0.5, adaptive_c=1.0, adaptive_reduce="mean")
    for _ in range(300):
        x, y = ds.sample(256, generator=g, with_labels=True)
        lo, _ = METHODS["meanflow"].loss(model, x, cond=y, **cfg)
        opt.zero_grad()
        lo.backward()
        opt.step()
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    lab = torch.arange(2000) % 2
    for k in (1, 2, 4):
        acc = {w: class_accuracy(sampling.sample(METHODS["meanflow"], model, noise, k, cond=lab,
                                                 guidance_scale=w).numpy(), lab.numpy(), "moons")
               for w in (0.0, 1.0, 2.0)}
        assert acc[0.0]["accuracy"] < 0.65, (k, acc)
        assert acc[1.0]["accuracy"] > 0.8, (k, acc)
        assert min(acc[2.0]["per_class"].values()) > min(acc[1.0]["per_class"].values()) + 0.02, (k, acc)


def test_quality_benchmark_strict_columns(tmp_path):
    """benchmarks/quality_2d.strict_columns on saved samples: data itself scores floor ~1, in-support 1,
    class accuracy ~1 with the loop's labels (sample i drawn for label i % num_classes)."""
    from tests.bench.helpers import benchmark_script
    mod = benchmark_script("quality_2d")
    ds = get_dataset("eight_gaussians")
    x, y = ds.sample(1600, generator=torch.Generator().manual_seed(0), with_labels=True)
    order = torch.argsort(y, stable=True)  # arrange so that sample i has label i % 8
    by = [x[order][y[order] == c] for c in range(8)]
    m = min(len(b) for b in by)
    x = torch.stack([b[:m] for b in by], 1).reshape(-1, 2)
    np.save(tmp_path / "reference.npy", ds.sample(x.shape[0], generator=torch.Generator().manual_seed(1)).numpy())
    np.save(tmp_path / "samples_nfe1.npy", x.numpy())
    np.save(tmp_path / "samples_nfe2.npy", np.random.default_rng(0).normal(size=(x.shape[0], 2)))
    row = mod.strict_columns(tmp_path, "eight_gaussians", cond=True)
    assert set(row) == {f"nfe{k}_{c}" for k in (1, 2) for c in ("floor", "mmd", "support", "class")}
    assert row["nfe1_class"] == 1.0 and row["nfe1_support"] > 0.97 and 0.5 < row["nfe1_floor"] < 1.6
    assert row["nfe2_floor"] > 5 * row["nfe1_floor"] and row["nfe2_support"] < 0.2 and row["nfe2_class"] < 0.5


def test_loop_trains_and_evaluates_with_guidance(tmp_path):
    """Through the training loop: --cond with label dropout builds the MLP with a null class (and, for
    iMF's guidance input, a 3-dimensional guidance embedding); --guidance-scale reaches the sampler; the
    2D evaluation records the in-support fraction and the class accuracy of the EMA samples."""
    import json
    from flowmap_kernels import train
    out = tmp_path / "imf"
    assert train.main(["--method", "imf", "--data", "eight_gaussians", "--cond", "--cfg", "cfg_dropout=0.2",
                       "--cfg", "cfg_omega_max=3.0", "--guidance-scale", "2", "--guidance-interval", "0.2", "1",
                       "--steps", "5", "--batch", "64", "--eval-samples", "200", "--out", str(out), "--no-progress",
                       "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["guidance"] == {"scale": 2.0, "interval": [0.2, 1.0], "mode": "input"}
    for k in ("1", "2", "4"):
        assert 0 <= m["nfe"][k]["in_support_ema"] <= 1 and 0 <= m["nfe"][k]["class_accuracy_ema"] <= 1
        assert set(m["nfe"][k]["class_accuracy_per_class_ema"]) == {str(c) for c in range(8)}
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["model"]["emb_y.weight"].shape[0] == 9 and ck["model"]["emb_w.net.0.weight"].shape[1] == 3
    # without CFG settings the conditional MLP is the one it always was (no null row, no guidance input)
    plain = tmp_path / "plain"
    assert train.main(["--method", "meanflow", "--data", "moons", "--cond", "--steps", "2", "--batch", "32",
                       "--no-eval", "--out", str(plain), "--no-progress", "--threads", "1"]) == 0
    ck = torch.load(plain / "checkpoint.pt", weights_only=True)
    assert ck["model"]["emb_y.weight"].shape[0] == 2 and not any(k.startswith("emb_w") for k in ck["model"])
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--guidance-interval", "0.2"])
    assert train.main(["--method", "tvm", "--guidance-scale", "2", "--out", str(tmp_path / "x")]) == 2
