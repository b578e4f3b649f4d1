"""Figures written by the training loop (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def loss_curve(losses, path, title=""):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    y = np.asarray(losses, dtype=np.float64)
    ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="loss")
    if len(y) >= 20:
        k = max(len(y) // 50, 5)
        ax.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
    if (y > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter_2d(reference, samples: dict, path, title=""):
    """reference (N, 2); samples {label: (M, 2)} -> one row of square panels, data first."""
    panels = [("data", reference)] + list(samples.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
    lim = np.percentile(np.abs(reference), 99.5) * 1.25
    for ax, (name, pts) in zip(np.atleast_1d(axes), panels):
        pts = np.asarray(pts)[:5000]
        ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.5, color="k" if name == "data" else "C0")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(images, path, title="", nrow=8):
    """images (N, C, H, W) in [-1, 1] -> a grid PNG (first nrow*nrow images)."""
    x = np.clip((np.asarray(images)[: nrow * nrow] + 1) / 2, 0, 1)
    n, c, h, w = x.shape
    ncol = int(np.ceil(n / nrow))
    grid = np.ones((ncol * (h + 1) + 1, nrow * (w + 1) + 1, c))
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + q * (w + 1): 1 + q * (w + 1) + w] = x[i].transpose(1, 2, 0)
    fig, ax = plt.subplots(figsize=(4, 4 * ncol / nrow + 0.4))
    ax.imshow(grid.squeeze(-1) if c == 1 else grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
