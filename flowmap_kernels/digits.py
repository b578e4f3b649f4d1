"""Two small networks for the 8x8 digits, trained once (deterministically, float64, CPU) and shipped.

Feature extractor (``assets/digits_features.npz``): an MLP 64 -> 128 -> 64 -> 10 (tanh) trained on a
fixed 1500-image split of scikit-learn's digits. Sample quality on digits is the Frechet distance between
Gaussians fitted to its 64 second-layer features (the digits analogue of FID, arXiv 1706.08500), beside
raw pixels: pixel statistics hardly see a missing class (700 samples without the 3s: 1.2x the
data-vs-data floor in pixels, 3.3x in features; only the digits 0-4: 6x vs 22x) and weigh pixel noise
that leaves the digit readable (6x vs 1.2x).

Autoencoder (``assets/digits_autoencoder.npz``): conv encoder 1x8x8 -> 2x4x4 latents (3x3 convs, 2x2
average pool), conv decoder back (nearest upsampling, tanh output), latents standardised per channel over
the training split. It gives the latent image path: ``--data digits_latent`` trains a flow map on the
latents (as latent diffusion, arXiv 2112.10752) and evaluation decodes the samples to pixels.

    features(x)            x (N, 1, 8, 8) or (N, 64) in [-1, 1] -> (N, 64) float64 numpy
    classify(x)            -> (N,) int64 numpy, the predicted digit
    frechet_features(a, b) Frechet distance of the features of two sample sets
    encode(x)              (N, 1, 8, 8) -> (N, 2, 4, 4) standardised latents (float32 torch, x's device)
    decode(z)              (N, 2, 4, 4) -> (N, 1, 8, 8) images in [-1, 1]

``python -m flowmap_kernels.digits --write`` retrains both and rewrites the assets.
"""
from __future__ import annotations

import argparse
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import frechet_distance

__all__ = ["features", "classify", "frechet_features", "encode", "decode", "LATENT_SHAPE", "load", "ASSETS"]

_DIR = Path(__file__).parent / "assets"
ASSETS = {"features": _DIR / "digits_features.npz", "autoencoder": _DIR / "digits_autoencoder.npz"}
LATENT_SHAPE = (2, 4, 4)
_SPLIT_SEED, _N_TRAIN = 0, 1500


def _split():
    """((x_train, y_train), (x_test, y_test)): the digits as float64 (N, 1, 8, 8) in [-1, 1], fixed split."""
    from .data import _digits_tensors
    x, y = _digits_tensors()
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(_SPLIT_SEED))
    x, y = x.double()[perm], y[perm]
    return (x[:_N_TRAIN], y[:_N_TRAIN]), (x[_N_TRAIN:], y[_N_TRAIN:])


def _init(shapes: dict, seed: int) -> dict:
    """Parameters from {name: shape}: weights ~ N(0, 1/fan_in), biases (1-D) zero."""
    g = torch.Generator().manual_seed(seed)
    p = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        t = (torch.randn(shape, generator=g, dtype=torch.float64) / fan_in ** 0.5 if len(shape) > 1
             else torch.zeros(shape, dtype=torch.float64))
        p[name] = t.requires_grad_()
    return p


def _fit(p: dict, loss_fn, steps: int, lr: float, weight_decay: float = 1e-4) -> None:
    """AdamW on ``loss_fn(p, step)``."""
    opt = torch.optim.AdamW(list(p.values()), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad()
        loss_fn(p, step).backward()
        opt.step()


# ---- feature extractor -----------------------------------------------------------------------------
def _classifier(p: dict, x: torch.Tensor):
    """(features (N, 64), logits (N, 10)) of images x (N, 64)."""
    h1 = torch.tanh(x @ p["w1"].T + p["b1"])
    h2 = torch.tanh(h1 @ p["w2"].T + p["b2"])
    return h2, h2 @ p["w3"].T + p["b3"]


def train_features(steps: int = 600, lr: float = 1e-2, seed: int = 0) -> dict:
    """Train the feature extractor; returns its weights (numpy) and ``test_accuracy``."""
    (xtr, ytr), (xte, yte) = _split()
    xtr, xte = xtr.reshape(-1, 64), xte.reshape(-1, 64)
    p = _init({"w1": (128, 64), "b1": (128,), "w2": (64, 128), "b2": (64,), "w3": (10, 64), "b3": (10,)}, seed)
    _fit(p, lambda p, _: F.cross_entropy(_classifier(p, xtr)[1], ytr), steps, lr)
    with torch.no_grad():
        acc = (_classifier(p, xte)[1].argmax(1) == yte).double().mean().item()
    return {**{k: v.detach().numpy() for k, v in p.items()}, "test_accuracy": np.float64(acc)}


# ---- autoencoder -----------------------------------------------------------------------------------
def _encoder(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.conv2d(x, p["e1"], p["eb1"], padding=1))
    h = F.avg_pool2d(torch.tanh(F.conv2d(h, p["e2"], p["eb2"], padding=1)), 2)
    return F.conv2d(h, p["e3"], p["eb3"], padding=1)


def _decoder(p: dict, z: torch.Tensor) -> torch.Tensor:
    h = F.interpolate(torch.tanh(F.conv2d(z, p["d1"], p["db1"], padding=1)), scale_factor=2, mode="nearest")
    h = torch.tanh(F.conv2d(h, p["d2"], p["db2"], padding=1))
    return torch.tanh(F.conv2d(h, p["d3"], p["db3"], padding=1))


def train_autoencoder(steps: int = 3000, lr: float = 3e-3, batch: int = 128, seed: int = 0) -> dict:
    """Train the autoencoder (MSE, float32 minibatches: CPU convolutions in float64 are ~10x slower);
    returns its weights, the latent mean/std per channel and the held-out reconstruction MSE ``test_mse``."""
    (xtr, _), (xte, _) = _split()
    c, w = LATENT_SHAPE[0], 16
    p = _init({"e1": (w, 1, 3, 3), "eb1": (w,), "e2": (w, w, 3, 3), "eb2": (w,), "e3": (c, w, 3, 3),
               "eb3": (c,), "d1": (w, c, 3, 3), "db1": (w,), "d2": (w, w, 3, 3), "db2": (w,),
               "d3": (1, w, 3, 3), "db3": (1,)}, seed)
    p = {k: v.detach().float().requires_grad_() for k, v in p.items()}
    idx = torch.randint(0, xtr.shape[0], (steps, batch), generator=torch.Generator().manual_seed(seed + 1))
    x32 = xtr.float()
    _fit(p, lambda p, s: F.mse_loss(_decoder(p, _encoder(p, x32[idx[s]])), x32[idx[s]]), steps, lr,
         weight_decay=0.0)
    p = {k: v.detach().double() for k, v in p.items()}
    with torch.no_grad():
        z = _encoder(p, xtr)
        mse = F.mse_loss(_decoder(p, _encoder(p, xte)), xte).item()
    return {**{k: v.detach().numpy() for k, v in p.items()}, "latent_mean": z.mean((0, 2, 3)).numpy(),
            "latent_std": z.std((0, 2, 3)).numpy(), "test_mse": np.float64(mse)}


_TRAIN = {"features": train_features, "autoencoder": train_autoencoder}


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The shipped weights of ``name`` ("features" or "autoencoder") as float64 tensors."""
    path = ASSETS[name]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run python -m flowmap_kernels.digits --write")
    with np.load(path) as z:
        return {k: torch.from_numpy(z[k].astype(np.float64)) for k in z.files}


def _images(x) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x.detach().cpu() if torch.is_tensor(x) else x), dtype=torch.float64)
    if x.dim() < 2 or x[0].numel() != 64:
        raise ValueError(f"x: expected digits of shape (N, 1, 8, 8) or (N, 64), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], 1, 8, 8)


@torch.no_grad()
def features(x) -> np.ndarray:
    """(N, 64) float64 features of digits x ((N, 1, 8, 8) or (N, 64), pixel range [-1, 1])."""
    return _classifier(load("features"), _images(x).reshape(-1, 64))[0].numpy()


@torch.no_grad()
def classify(x) -> np.ndarray:
    """(N,) predicted digit of each image."""
    return _classifier(load("features"), _images(x).reshape(-1, 64))[1].argmax(1).numpy()


def frechet_features(a, b) -> float:
    """Frechet distance between the Gaussians fitted to the features of sample sets a and b."""
    return frechet_distance(features(a), features(b))


def _stats(p):
    return p["latent_mean"].view(1, -1, 1, 1), p["latent_std"].view(1, -1, 1, 1)


@torch.no_grad()
def encode(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) images in [-1, 1] -> (N, 2, 4, 4) latents, standardised per channel (float32)."""
    p = load("autoencoder")
    mean, std = _stats(p)
    z = (_encoder(p, _images(x)) - mean) / std
    return z.to(device=x.device if torch.is_tensor(x) else "cpu", dtype=torch.float32)


@torch.no_grad()
def decode(z: torch.Tensor) -> torch.Tensor:
    """(N, 2, 4, 4) standardised latents -> (N, 1, 8, 8) images in [-1, 1] (float32, z's device)."""
    if z.dim() != 4 or tuple(z.shape[1:]) != LATENT_SHAPE:
        raise ValueError(f"z: expected latents of shape (N, {', '.join(map(str, LATENT_SHAPE))}), "
                         f"got {tuple(z.shape)}")
    p = load("autoencoder")
    mean, std = _stats(p)
    x = _decoder(p, z.detach().cpu().double() * std + mean)
    return x.to(device=z.device, dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowmap_kernels.digits", description=__doc__.split("\n")[0])
    ap.add_argument("--write", nargs="*", choices=list(ASSETS), default=None,
                    help="retrain and rewrite these assets (all when none is named)")
    a = ap.parse_args(argv)
    for name in (a.write or list(ASSETS)) if a.write is not None else []:
        w = _TRAIN[name]()
        ASSETS[name].parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(ASSETS[name], **{k: v.astype(np.float32) if v.ndim else v for k, v in w.items()})
        load.cache_clear()
    print(f"features: held-out accuracy {float(load('features')['test_accuracy']):.4f}; "
          f"autoencoder: held-out reconstruction MSE {float(load('autoencoder')['test_mse']):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
