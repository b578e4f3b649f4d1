"""Offline training data: generated 2D toy distributions and scikit-learn's bundled 8x8 digits.

Nothing is downloaded: the 2D sets are generated on the fly from a ``torch.Generator`` and the digits
ship inside scikit-learn (``sklearn.datasets.load_digits``).

    ds = get_dataset("checkerboard")      # names: DATASETS
    x = ds.sample(512, generator=g)       # (512, 2) float32; digits: (512, 1, 8, 8) in [-1, 1]
                                          # digits_latent: (512, 2, 4, 4) autoencoder latents (ds.decode)

Every dataset is an infinite sampler: a batch is a pure function of the generator state, so saving
``generator.get_state()`` is enough to resume the data stream exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["Dataset", "DATASETS", "get_dataset"]


@dataclass(frozen=True)
class Dataset:
    """A named infinite sampler. ``shape`` is the shape of one sample (without the batch dimension)."""

    name: str
    shape: tuple
    kind: str  # "2d" or "image" (image-shaped (C, H, W): pixels, or latents when ``decode`` is set)
    _sample: Callable
    num_classes: Optional[int] = None
    #: latents -> pixel images, and the dataset those pixels are compared with (latent data only)
    decode: Optional[Callable] = None
    pixels: Optional[str] = None

    def sample(self, n: int, generator: Optional[torch.Generator] = None, with_labels: bool = False):
        """n samples, float32 (n, *shape); with ``with_labels`` also int64 labels (n,) (or None)."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        x, y = self._sample(n, generator)
        return (x, y) if with_labels else x


def _checkerboard(n, g):
    # 8 unit squares of a 4x4 board on [-2, 2]^2 (the FFJORD toy set).
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1), None


def _moons(n, g, noise=0.05):
    # two interleaving half circles (as sklearn.datasets.make_moons), centred and scaled to about [-2, 2]^2
    label = torch.randint(0, 2, (n,), generator=g)
    a = torch.rand(n, generator=g) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(a), 0.5 - torch.sin(a)], 1)
    x = torch.where(label[:, None] == 0, upper, lower)
    x = x + noise * torch.randn(n, 2, generator=g)
    return (x - torch.tensor([0.5, 0.25])) * 2.0, label


def _eight_gaussians(n, g, radius=2.0, std=0.15):
    k = torch.randint(0, 8, (n,), generator=g)
    ang = k.float() * (2 * math.pi / 8)
    centers = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    return centers + std * torch.randn(n, 2, generator=g), k


_DIGITS = {}


def _digits_tensors():
    if "x" not in _DIGITS:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
            raise ImportError("dataset 'digits' needs scikit-learn (pip install scikit-learn)") from e
        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
        _DIGITS["x"] = x[:, None]  # (1797, 1, 8, 8)
        _DIGITS["y"] = torch.tensor(d.target, dtype=torch.int64)
    return _DIGITS["x"], _DIGITS["y"]


def _digits(n, g):
    x, y = _digits_tensors()
    idx = torch.randint(0, x.shape[0], (n,), generator=g)  # with replacement: stateless sampler
    return x[idx], y[idx]


def _digits_latent(n, g):
    if "z" not in _DIGITS:
        from .digits import encode
        _DIGITS["z"] = encode(_digits_tensors()[0])  # (1797, 2, 4, 4), encoded once
    z, y = _DIGITS["z"], _digits_tensors()[1]
    idx = torch.randint(0, z.shape[0], (n,), generator=g)
    return z[idx], y[idx]


def _decode_digits(z):
    from .digits import decode
    return decode(z)


DATASETS = {
    "checkerboard": Dataset("checkerboard", (2,), "2d", _checkerboard),
    "moons": Dataset("moons", (2,), "2d", _moons, num_classes=2),
    "eight_gaussians": Dataset("eight_gaussians", (2,), "2d", _eight_gaussians, num_classes=8),
    "digits": Dataset("digits", (1, 8, 8), "image", _digits, num_classes=10),
    # the digits in the latent space of the shipped autoencoder (flowmap_kernels.digits): latent image path
    "digits_latent": Dataset("digits_latent", (2, 4, 4), "image", _digits_latent, num_classes=10,
                             decode=_decode_digits, pixels="digits"),
}


def get_dataset(name: str) -> Dataset:
    """The dataset called ``name`` (one of DATASETS); ValueError naming the choices otherwise."""
    if name not in DATASETS:
        raise ValueError(f"data: unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]
