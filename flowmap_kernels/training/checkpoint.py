"""Checkpoints that resume bit-for-bit and load with torch.load(weights_only=True).

Stored: model, EMA, optimizer state dicts; the step; the loss history; and every RNG the loop uses
(torch CPU, CUDA when present, numpy's global MT19937, python's random, the data generator), per rank.
Everything is tensors or primitive containers; numpy's key array is stored as a tensor.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def rng_state(data_generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                     "pos": int(pos), "has_gauss": int(has_gauss),
                                                     "cached": float(cached)},
          "python": random.getstate(), "data": data_generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict, data_generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    data_generator.set_state(st["data"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (tmp file + os.replace) so a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
