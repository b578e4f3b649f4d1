"""A small fixed feature extractor for the 8x8 digits, trained once and shipped with the package.

Sample quality on digits is measured as the Frechet distance between Gaussians fitted to these features
(the digits analogue of FID, arXiv 1706.08500), not only to raw pixels: pixel statistics hardly see a
missing class (700 samples without the 3s: 1.2x the data-vs-data floor in pixels, 3.3x in features;
only the digits 0-4: 6x vs 22x) and weigh pixel noise that leaves the digit readable (6x vs 1.2x). The network is an MLP 64 -> 128 -> 64 -> 10
(tanh), trained full-batch in float64 on a fixed 1500-image split of scikit-learn's digits; the 64
features are the second hidden layer. Its weights lie in ``assets/digits_features.npz`` with the split's
test accuracy; ``python -m flowmap_kernels.digits_features --write`` retrains and rewrites them.

    features(x)            x (N, 1, 8, 8) or (N, 64) in [-1, 1] -> (N, 64) float64 numpy
    classify(x)            -> (N,) int64 numpy, the predicted digit
    frechet_features(a, b) Frechet distance of the features of two sample sets
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .metrics import frechet_distance

__all__ = ["features", "classify", "frechet_features", "load", "train", "ASSET"]

ASSET = Path(__file__).parent / "assets" / "digits_features.npz"
_SPLIT_SEED, _N_TRAIN = 0, 1500
_LAYERS = ("w1", "b1", "w2", "b2", "w3", "b3")


def _split():
    from .data import _digits_tensors
    x, y = _digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(_SPLIT_SEED))
    x = x.reshape(x.shape[0], -1).double()[perm]
    y = y[perm]
    return (x[:_N_TRAIN], y[:_N_TRAIN]), (x[_N_TRAIN:], y[_N_TRAIN:])


def _forward(p: dict, x: torch.Tensor):
    h1 = torch.tanh(x @ p["w1"].T + p["b1"])
    h2 = torch.tanh(h1 @ p["w2"].T + p["b2"])
    return h2, h2 @ p["w3"].T + p["b3"]


def train(steps: int = 600, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Train the extractor (deterministic, float64, CPU); returns the weights and the test accuracy."""
    (xtr, ytr), (xte, yte) = _split()
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (128, 64), "w2": (64, 128), "w3": (10, 64)}
    p = {}
    for name, (o, i) in shapes.items():
        p[name] = (torch.randn(o, i, generator=g, dtype=torch.float64) / i ** 0.5).requires_grad_()
        p["b" + name[1]] = torch.zeros(o, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW(list(p.values()), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(_forward(p, xtr)[1], ytr).backward()
        opt.step()
    with torch.no_grad():
        acc = (_forward(p, xte)[1].argmax(1) == yte).double().mean().item()
    out = {k: v.detach().numpy() for k, v in p.items()}
    out["test_accuracy"] = np.float64(acc)
    return out


@lru_cache(maxsize=1)
def load() -> dict:
    """The shipped weights as float64 tensors (and ``test_accuracy``)."""
    if not ASSET.exists():
        raise FileNotFoundError(f"{ASSET} is missing: run python -m flowmap_kernels.digits_features --write")
    with np.load(ASSET) as z:
        return {k: torch.from_numpy(z[k].astype(np.float64)) for k in z.files}


def _rows(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if x.dim() < 2 or x[0].numel() != 64:
        raise ValueError(f"x: expected digits of shape (N, 1, 8, 8) or (N, 64), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], 64)


@torch.no_grad()
def features(x) -> np.ndarray:
    """(N, 64) float64 features of digits x ((N, 1, 8, 8) or (N, 64), pixel range [-1, 1])."""
    return _forward(load(), _rows(x))[0].numpy()


@torch.no_grad()
def classify(x) -> np.ndarray:
    """(N,) predicted digit of each image."""
    return _forward(load(), _rows(x))[1].argmax(1).numpy()


def frechet_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted to the features of sample sets a and b."""
    return frechet_distance(features(a), features(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowmap_kernels.digits_features", description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"retrain and write {ASSET.name}")
    a = ap.parse_args(argv)
    if a.write:
        w = train()
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(ASSET, **{k: (v.astype(np.float32) if k in _LAYERS else v) for k, v in w.items()})
        load.cache_clear()
    print(f"{ASSET}: held-out test accuracy {float(load()['test_accuracy']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
