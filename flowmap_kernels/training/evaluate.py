"""Evaluation of a trained flow map: samples at 1, 2, 4 steps (flow-map samplers) or Euler at 1..64 steps
(flow matching), from the EMA and the raw weights; metric against fresh data; .npy files and figures.

Metric: sliced Wasserstein distance (2D data) or Frechet distance on raw pixels (digits; latent data is
decoded to pixels first and also reports the autoencoder's own floor), with the same metric for standard
normal noise as the baseline. Digits also get the Frechet distance on the shipped feature extractor
(``fd_features``, :mod:`flowmap_kernels.digits`) and, with ``--cond``, the fraction of samples that its
classifier assigns to their label (``class_accuracy_ema``). Everything is drawn from generators seeded
with EVAL_SEED, so two runs with the same weights give the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import sampling
from ..data import get_dataset
from ..metrics import (CLASS_DATASETS, SUPPORT_DATASETS, class_accuracy, frechet_distance, in_support_fraction,
                       sliced_wasserstein)

__all__ = ["EVAL_SEED", "evaluate", "write_figures"]

EVAL_SEED = 20261122


@torch.no_grad()
def evaluate(method, ds, model, ema_model, out: Path, cfg, device, losses) -> dict:
    """Sample at each step count with EMA and raw weights (unsharded modules on ``device``); returns the
    metrics, writes reference.npy / samples_nfe{1,2,4}.npy (2D data) and the figures into ``out``.
    ``cfg``: the TrainConfig (eval_samples, cond, method, data, steps); ``losses``: the loss history."""
    nfes = [1, 2, 4, 8, 16, 32, 64] if method.SAMPLER == "euler" else [1, 2, 4]
    g = torch.Generator().manual_seed(EVAL_SEED)
    n = cfg.eval_samples
    model.eval()
    res = {"sampler": method.SAMPLER, "nfe": {}}
    if getattr(cfg, "guidance_scale", None) is not None:
        res["guidance"] = {"scale": cfg.guidance_scale, "interval": list(cfg.guidance_interval),
                           "mode": getattr(method, "GUIDANCE", "cfg")}
    if ds.kind == "2d":
        ref = ds.sample(n, generator=g)
        noise = torch.randn((n, *ds.shape), generator=g)
        baseline_noise = torch.randn((n, *ds.shape), generator=g)
        fresh = ds.sample(n, generator=g)
        res.update(metric="swd", baseline_noise=sliced_wasserstein(baseline_noise.numpy(), ref.numpy()),
                   data_vs_data=sliced_wasserstein(fresh.numpy(), ref.numpy()))
        np.save(out / "reference.npy", ref.numpy())
    else:
        # pixel data, or latents decoded to pixels and compared with the pixel dataset
        pixel_ds = get_dataset(ds.pixels) if ds.decode is not None else ds
        ref = pixel_ds.sample(n, generator=g)  # with replacement from the 1797 digits
        noise = torch.randn((min(n, 2000), *ds.shape), generator=g)
        pixel_noise = torch.randn((2000, *pixel_ds.shape), generator=g)
        fresh = pixel_ds.sample(2000, generator=g)
        res.update(metric="fd", baseline_noise=frechet_distance(pixel_noise.numpy(), ref.numpy()),
                   data_vs_data=frechet_distance(fresh.numpy(), ref.numpy()))
        from .. import digits
        ref_features = digits.features(ref)  # extracted once: every feature distance is to this reference

        def fd_features(x):
            return frechet_distance(digits.features(x), ref_features)
        res["fd_features"] = {"baseline_noise": fd_features(pixel_noise), "data_vs_data": fd_features(fresh)}
        if ds.decode is not None:  # what the autoencoder alone costs: its reconstructions of fresh data
            recon = ds.decode(ds.sample(2000, generator=g))
            res["autoencoder_floor"] = {"fd": frechet_distance(recon.numpy(), ref.numpy()),
                                        "fd_features": fd_features(recon)}
    ncls = ds.num_classes if cfg.cond else None
    cond = (torch.arange(noise.shape[0]) % ncls).to(device) if ncls else None
    metric = sliced_wasserstein if ds.kind == "2d" else frechet_distance
    shown = {}
    for k in nfes:
        entry = {}
        for name, net in (("ema", ema_model), ("raw", model)):
            sg = torch.Generator(device=device).manual_seed(EVAL_SEED + k)
            x = sampling.sample(method, net, noise.to(device), k, cond=cond, generator=sg,
                                guidance_scale=getattr(cfg, "guidance_scale", None),
                                guidance_interval=getattr(cfg, "guidance_interval", (0.0, 1.0))).cpu()
            if ds.decode is not None:
                x = ds.decode(x)
            entry[name] = metric(x.numpy(), ref.numpy())
            if name == "ema" and ds.name in SUPPORT_DATASETS:
                entry["in_support_ema"] = in_support_fraction(x.numpy(), ds.name)
            if name == "ema" and ds.kind != "2d":
                entry["fd_features_ema"] = fd_features(x)
            if name == "ema" and cond is not None and (ds.pixels or ds.name) in CLASS_DATASETS:
                ca = class_accuracy(x.numpy(), cond.cpu().numpy(), ds.pixels or ds.name)
                entry["class_accuracy_ema"] = ca["accuracy"]
                entry["class_accuracy_per_class_ema"] = {str(c): v for c, v in ca["per_class"].items()}
            if name == "ema":
                if ds.kind == "2d" and k in (1, 2, 4):
                    np.save(out / f"samples_nfe{k}.npy", x.numpy())
                if k in (1, 2, 4) or k == nfes[-1]:
                    shown[f"{'Euler ' if method.SAMPLER == 'euler' else ''}{k} step{'s' if k > 1 else ''}"
                          f" ({res['metric']} {entry['ema']:.3f})"] = x.numpy()
        entry["ratio_to_noise_ema"] = entry["ema"] / res["baseline_noise"]
        res["nfe"][str(k)] = entry
    model.train()
    write_figures(cfg, ds, losses, ref, shown, out)
    return res


def write_figures(cfg, ds, losses, ref, shown: dict, out: Path) -> None:
    """loss_curve.png, and samples.png (2D: data and each step count) or samples_nfe{k}.png (images)."""
    from . import plots
    title = f"{cfg.method} on {cfg.data}, {cfg.steps} steps (EMA weights)"
    plots.loss_curve(losses, out / "loss_curve.png", f"{cfg.method} on {cfg.data}")
    if ds.kind == "2d":
        plots.scatter_2d(ref.numpy(), shown, out / "samples.png", title)
    else:
        for name, x in shown.items():
            k = name.split(" step")[0].split()[-1]
            plots.image_grid(x, out / f"samples_nfe{k}.png", f"{cfg.method}: {name}")
