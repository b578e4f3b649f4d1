"""Sample-quality metrics (numpy, float64).

    sliced_wasserstein(a, b, n_projections=1024, seed=0)
        a (N, d), b (M, d). Mean over random unit directions w of W1(<a, w>, <b, w>), the 1D
        Wasserstein-1 distance of the projections (quantile functions compared on a common grid when
        N != M). Directions from numpy's default_rng(seed): a fixed seed gives a fixed metric.
    frechet_distance(a, b)
        ||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)) of Gaussians fitted to the flattened rows
        (raw pixels for digits). scipy.linalg.sqrtm when scipy is importable, else a symmetric
        eigen-decomposition form: tr((Ca Cb)^(1/2)) = sum sqrt(eig(sqrt(Ca) Cb sqrt(Ca))).
    floor_corrected_swd(a, refs)
        SWD(a, ref_k) / (mean pairwise SWD of the refs) over K >= 2 independent data draws: 1 = as close
        as data is.
    mmd_rbf(a, b, bandwidth=0.05)
        unbiased squared MMD with a narrow Gaussian kernel (sharper than SWD on thin structures).
    in_support_fraction(x, data)
        fraction of 2D samples inside checkerboard's squares / 3 std of eight_gaussians' centres / near
        the moons' arcs.
    class_accuracy(x, labels, data)
        fraction of class-conditional samples whose nearest class region is their label (eight_gaussians,
        moons; digits: the label the shipped classifier of flowmap_kernels.digits reads), overall
        and per class.
"""
from __future__ import annotations

import numpy as np

__all__ = ["sliced_wasserstein", "frechet_distance", "floor_corrected_swd", "mmd_rbf", "in_support_fraction",
           "nearest_class", "class_accuracy", "SUPPORT_DATASETS", "CLASS_DATASETS"]


def _as2d(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(f"{name}: expected (N, ...) with N >= 2 samples, got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def sliced_wasserstein(a, b, n_projections: int = 1024, seed: int = 0) -> float:
    a, b = _as2d(a, "a"), _as2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return float("inf")
    w = np.random.default_rng(seed).standard_normal((a.shape[1], n_projections))
    w /= np.linalg.norm(w, axis=0, keepdims=True)
    pa, pb = np.sort(a @ w, axis=0), np.sort(b @ w, axis=0)
    if pa.shape[0] != pb.shape[0]:
        q = (np.arange(max(pa.shape[0], pb.shape[0])) + 0.5) / max(pa.shape[0], pb.shape[0])
        pa = np.quantile(pa, q, axis=0)
        pb = np.quantile(pb, q, axis=0)
    return float(np.abs(pa - pb).mean())


def _trace_sqrt_product(ca, cb) -> float:
    try:
        from scipy.linalg import sqrtm
        m = sqrtm(ca @ cb)
        return float(np.real(np.trace(m)))
    except ImportError:
        ev, U = np.linalg.eigh(ca)
        sa = (U * np.sqrt(np.clip(ev, 0, None))) @ U.T
        lam = np.linalg.eigvalsh(sa @ cb @ sa)
        return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(a, b) -> float:
    a, b = _as2d(a, "a"), _as2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return float("inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * _trace_sqrt_product(ca, cb))


# ---------------------------------------------------------------------------------------------------
# Stricter 2D measures: floor-corrected SWD, a small-bandwidth MMD, the in-support fraction and the
# class accuracy of conditional samples.
# ---------------------------------------------------------------------------------------------------

def floor_corrected_swd(a, refs, n_projections: int = 1024, seed: int = 0) -> dict:
    """SWD of the samples ``a`` divided by the data-vs-data SWD at the same sample size, over several
    independent reference draws ``refs`` (a sequence of K >= 2 arrays (M, d) of fresh data).

    The floor is the mean SWD over the K (K - 1) / 2 pairs of reference draws (two data draws of this size
    are that far apart; one pair alone is noisy: on checkerboard at 10,000 points single pairs vary by
    about +-25%); for reference k, ratio_k = SWD(a, ref_k) / floor. A ratio near 1 means the samples are
    as close to the data as data is; the raw SWD cannot say that because its floor depends on the sample
    size. Returns {"ratios", "mean", "min", "max", "swd", "floor", "floor_pairs"} (ratios and SWDs per
    reference, their summaries, the floor and its pairwise values)."""
    refs = [_as2d(r, f"refs[{i}]") for i, r in enumerate(refs)]
    if len(refs) < 2:
        raise ValueError(f"refs: expected at least 2 independent reference draws, got {len(refs)}")
    swd = [sliced_wasserstein(a, r, n_projections, seed) for r in refs]
    pairs = [sliced_wasserstein(refs[i], refs[j], n_projections, seed)
             for i in range(len(refs)) for j in range(i + 1, len(refs))]
    floor = float(np.mean(pairs))
    ratios = [s / floor if floor > 0 else float("inf") for s in swd]
    return {"ratios": ratios, "mean": float(np.mean(ratios)), "min": float(np.min(ratios)),
            "max": float(np.max(ratios)), "swd": swd, "floor": floor, "floor_pairs": pairs}


def mmd_rbf(a, b, bandwidth: float = 0.05, max_samples: int = 4000, chunk: int = 2048) -> float:
    """Unbiased squared maximum mean discrepancy with the Gaussian kernel k(x, y) = exp(-|x - y|^2 /
    (2 h^2)), h = ``bandwidth`` (in data units; small h compares the densities at that scale: mass
    between the checkerboard's squares or the moons' arcs, which SWD's 1D projections blur). Uses the
    first ``max_samples`` rows of each set (O(N^2) kernel sums, computed in chunks, float64).
    0 in expectation when a and b come from one distribution (can be slightly negative)."""
    a, b = _as2d(a, "a"), _as2d(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a, b: feature sizes differ ({a.shape[1]} vs {b.shape[1]})")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: expected a positive number, got {bandwidth!r}")
    if not np.isfinite(a).all() or not np.isfinite(b).all():
        return float("inf")
    a, b = a[:max_samples], b[:max_samples]
    g = 1.0 / (2.0 * bandwidth ** 2)

    def ksum(x, y):
        tot = 0.0
        for i in range(0, x.shape[0], chunk):
            d = ((x[i:i + chunk, None, :] - y[None, :, :]) ** 2).sum(-1)
            tot += float(np.exp(-g * d).sum())
        return tot

    n, m = a.shape[0], b.shape[0]
    kaa = (ksum(a, a) - n) / (n * (n - 1))  # the diagonal k(x, x) = 1 removed
    kbb = (ksum(b, b) - m) / (m * (m - 1))
    kab = ksum(a, b) / (n * m)
    return float(kaa + kbb - 2 * kab)


# geometry of the labelled / bounded 2D sets (flowmap_kernels.data: the same constants)
_EIGHT_RADIUS, _EIGHT_STD = 2.0, 0.15
_MOONS_NOISE, _MOONS_SCALE, _MOONS_SHIFT = 0.05, 2.0, np.array([0.5, 0.25])


def _eight_centres() -> np.ndarray:
    ang = np.arange(8) * (2 * np.pi / 8)
    return _EIGHT_RADIUS * np.stack([np.cos(ang), np.sin(ang)], 1)


def _moon_distances(x: np.ndarray) -> np.ndarray:
    """(N, 2) distances to the two moons' centre curves (label 0: upper arc, 1: lower arc), data units."""
    p = x / _MOONS_SCALE + _MOONS_SHIFT  # back to make_moons coordinates
    out = np.empty((x.shape[0], 2))
    for k, (c, upper) in enumerate((((0.0, 0.0), True), ((1.0, 0.5), False))):
        c = np.asarray(c)
        r = np.linalg.norm(p - c, axis=1)
        on_arc = (p[:, 1] >= c[1]) if upper else (p[:, 1] <= c[1])
        ends = np.stack([c + [1.0, 0.0], c - [1.0, 0.0]])
        end_d = np.linalg.norm(p[:, None, :] - ends[None], axis=2).min(1)
        out[:, k] = np.where(on_arc, np.abs(r - 1.0), end_d)
    return out * _MOONS_SCALE


SUPPORT_DATASETS = ("checkerboard", "eight_gaussians", "moons")
CLASS_DATASETS = ("eight_gaussians", "moons", "digits")


def in_support_fraction(x, data: str, margin: float = 0.0) -> float:
    """Fraction of the samples x (N, 2) inside the data's support region:

    checkerboard: the 8 unit squares (a point within ``margin`` of a square counts);
    eight_gaussians: within 3 std (0.45) + margin of a mixture centre (the data itself: 1 - e^-4.5 = 98.9%);
    moons: within 3 x (noise 0.05 x scale 2) = 0.3 + margin of a moon's centre curve (data: about 99.7%).
    Non-finite samples count as outside."""
    x = _as2d(x, "x")
    if x.shape[1] != 2:
        raise ValueError(f"x: expected 2D points (N, 2), got shape {x.shape}")
    if data not in SUPPORT_DATASETS:
        raise ValueError(f"data: expected one of {list(SUPPORT_DATASETS)}, got {data!r}")
    if margin < 0:
        raise ValueError(f"margin: expected a number >= 0, got {margin!r}")
    fin = np.isfinite(x).all(1)
    x = np.where(fin[:, None], x, 1e6)
    if data == "checkerboard":
        # squares [i, i+1) x [j, j+1) with i, j in {-2..1} and i + j even; distance to the nearest one
        best = np.full(x.shape[0], np.inf)
        for i in range(-2, 2):
            for j in range(-2, 2):
                if (i + j) % 2:
                    continue
                dx = np.maximum(np.maximum(i - x[:, 0], x[:, 0] - (i + 1)), 0)
                dy = np.maximum(np.maximum(j - x[:, 1], x[:, 1] - (j + 1)), 0)
                best = np.minimum(best, np.hypot(dx, dy))
        inside = best <= margin
    elif data == "eight_gaussians":
        d = np.linalg.norm(x[:, None, :] - _eight_centres()[None], axis=2).min(1)
        inside = d <= 3 * _EIGHT_STD + margin
    else:
        inside = _moon_distances(x).min(1) <= 3 * _MOONS_NOISE * _MOONS_SCALE + margin
    return float((inside & fin).mean())


def nearest_class(x, data: str) -> np.ndarray:
    """The class region each point falls in: the nearest mixture centre (eight_gaussians, labels
    0..7 counter-clockwise from angle 0), the nearest moon curve (moons: 0 upper, 1 lower), or the digit
    the shipped classifier reads (digits, :mod:`flowmap_kernels.digits`)."""
    x = _as2d(x, "x")
    if data not in CLASS_DATASETS:
        raise ValueError(f"data: expected one of {list(CLASS_DATASETS)}, got {data!r}")
    if data == "digits":
        from .digits import classify
        return classify(x)
    if data == "eight_gaussians":
        return np.linalg.norm(x[:, None, :] - _eight_centres()[None], axis=2).argmin(1)
    return _moon_distances(x).argmin(1)


def class_accuracy(x, labels, data: str) -> dict:
    """Fidelity of class-conditional samples: the fraction of samples drawn for label c whose class
    region (nearest_class) is c. Returns {"accuracy": overall, "per_class": {c: fraction}} over
    the labels present; non-finite samples count as wrong."""
    x = _as2d(x, "x")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels: expected {x.shape[0]} labels (one per sample), got {labels.shape[0]}")
    fin = np.isfinite(x).all(1)
    hit = (nearest_class(np.where(fin[:, None], x, 0.0), data) == labels) & fin
    per = {int(c): float(hit[labels == c].mean()) for c in np.unique(labels)}
    return {"accuracy": float(hit.mean()), "per_class": per}
