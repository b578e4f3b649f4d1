"""Sample-quality metrics (numpy, float64).

    sliced_wasserstein(a, b, n_projections=1024, seed=0)
        a (N, d), b (M, d). Mean over random unit directions w of W1(<a, w>, <b, w>), the 1D
        Wasserstein-1 distance of the projections (quantile functions compared on a common grid when
        N != M). Directions from numpy's default_rng(seed): a fixed seed gives a fixed metric.
    frechet_distance(a, b)
        ||mu_a - mu_b||^2 + tr(Ca + Cb - 2 (Ca Cb)^(1/2)) of Gaussians fitted to the flattened rows
        (raw pixels for digits). scipy.linalg.sqrtm when scipy is importable, else a symmetric
        eigen-decomposition form: tr((Ca Cb)^(1/2)) = sum sqrt(eig(sqrt(Ca) Cb sqrt(Ca))).
"""
from __future__ import annotations

import numpy as np

__all__ = ["sliced_wasserstein", "frechet_distance"]


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
