"""Sample quality of the flow-map methods on a 2D toy set: method x number of steps table.

    PYTHONPATH=. python benchmarks/quality_2d.py                       # meanflow, tvm, fm on checkerboard
    PYTHONPATH=. python benchmarks/quality_2d.py --methods tvm,lsd,esd,shortcut,scm,imf --data moons
    PYTHONPATH=. python benchmarks/quality_2d.py --methods meanflow --seeds 0,1,2,3,4,5   # + a mean row

Each method trains with the training loop's defaults (python -m flowmap_kernels.train; its 2D presets)
unless --steps/--batch/--width/--eval-samples are given, then is sampled from t = 1 to t = 0 with 1, 2
and 4 steps (flow matching: Euler with 1..64). The metric is the sliced Wasserstein distance to 10,000
fresh data points (1024 fixed random projections); the noise baseline is the same distance for standard
normal samples.
With several --seeds each method trains once per seed and gets a "mean" row over them.
Stricter columns from the saved samples (flowmap_kernels.metrics; --no-strict to skip): nfe{k}_floor
the floor-corrected SWD (mean over 4 fresh reference draws of the sample size: 1 = as close as data),
nfe{k}_mmd the squared MMD with bandwidth 0.05 against the evaluation's reference points (first 4,000),
nfe{k}_support the in-support fraction (checkerboard, eight_gaussians, moons), and with --cond on labelled
data (eight_gaussians, moons) nfe{k}_class, the class accuracy (the loop samples label i % num_classes
for sample i).
Writes <out>/quality_<data>.csv and .md, one training folder per method (and seed) under <out>.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from flowmap_kernels import train
from flowmap_kernels.data import get_dataset
from flowmap_kernels.metrics import (CLASS_DATASETS, SUPPORT_DATASETS, class_accuracy, floor_corrected_swd,
                                     in_support_fraction, mmd_rbf)


def strict_columns(folder, data, cond=False, n_refs=4) -> dict:
    """The stricter measures of the saved EMA samples (samples_nfe{k}.npy against reference.npy)."""
    ref = np.load(folder / "reference.npy")
    ds = get_dataset(data)
    refs = [ds.sample(ref.shape[0], generator=torch.Generator().manual_seed(777 + i)).numpy() for i in range(n_refs)]
    row = {}
    for k in (1, 2, 4):
        f = folder / f"samples_nfe{k}.npy"
        if not f.exists():
            continue
        x = np.load(f)
        row[f"nfe{k}_floor"] = round(floor_corrected_swd(x, refs)["mean"], 3)
        row[f"nfe{k}_mmd"] = round(mmd_rbf(x, ref, bandwidth=0.05), 5)
        if data in SUPPORT_DATASETS:
            row[f"nfe{k}_support"] = round(in_support_fraction(x, data), 4)
        if cond and data in CLASS_DATASETS:
            labels = np.arange(x.shape[0]) % ds.num_classes
            row[f"nfe{k}_class"] = round(class_accuracy(x, labels, data)["accuracy"], 4)
    return row


def _train_argv(m, seed, a, out, many):
    """The training folder and the command line of python -m flowmap_kernels.train for method ``m``."""
    folder = out / (f"{m}_{a.data}_s{seed}" if many else f"{m}_{a.data}")
    argv_m = ["--method", m, "--data", a.data, "--out", str(folder), "--no-progress", "--overwrite",
              "--seed", str(seed),
              "--threads", str(a.threads)] + (["--cond"] if a.cond else [])
    for flag, val in (("--steps", a.steps), ("--batch", a.batch), ("--width", a.width),
                      ("--eval-samples", a.eval_samples)):
        if val is not None:
            argv_m += [flag, str(val)]
    return folder, argv_m


def _train_one(m, seed, a, out, many):
    folder, argv_m = _train_argv(m, seed, a, out, many)
    print(f"== {m}: python -m flowmap_kernels.train {' '.join(argv_m)}", flush=True)
    if train.main(argv_m) != 0:
        return None
    met = json.loads((folder / "metrics.json").read_text())
    row = {"method": m, "seed": seed, "steps": met["steps"], "batch": met["batch_per_rank"], "params": met["params"],
           "train_s": met["train_time_s"], "noise_swd": round(met["baseline_noise"], 4),
           "data_swd": round(met["data_vs_data"], 4)}
    for k, v in met["nfe"].items():
        row[f"nfe{k}"] = round(v["ema"], 4)
        row[f"nfe{k}/noise"] = round(v["ratio_to_noise_ema"], 3)
    if a.strict and (folder / "reference.npy").exists():
        row.update(strict_columns(folder, a.data, a.cond))
    return row


def _mean_row(m, runs):
    row = {"method": m, "seed": "mean"}
    for k in runs[0]:
        if (k.startswith("nfe") or k == "train_s") and all(k in r for r in runs):
            row[k] = round(sum(r[k] for r in runs) / len(runs), 4 if k != "train_s" else 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="meanflow,tvm,fm")
    p.add_argument("--data", default="checkerboard")
    p.add_argument("--out", default="bench_out/quality_2d")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--eval-samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--cond", action="store_true",
                   help="class-conditional training (labelled data); adds class accuracy")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="skip the floor-corrected SWD, MMD, in-support and class-accuracy columns")
    a = p.parse_args(argv)
    from flowmap_kernels.data import DATASETS
    from flowmap_kernels.methods import METHODS
    out = Path(a.out)
    methods = [x.strip() for x in a.methods.split(",") if x.strip()]  # usage errors before the first training
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods: expected comma-separated names from {', '.join(sorted(METHODS))}, got {a.methods!r}")
    if a.data not in DATASETS:
        p.error(f"--data: unknown dataset {a.data!r}; choose one of {', '.join(sorted(DATASETS))}")
    try:
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        p.error(f"--seeds: expected comma-separated integers, got {a.seeds!r}")
    from flowmap_kernels.training.config import resolve_config
    for m in methods:  # the training loop's own checks (--steps, --batch, --cond, ...) of every run, up front
        for seed in seeds:
            try:
                resolve_config(train.build_parser().parse_args(_train_argv(m, seed, a, out, len(seeds) > 1)[1]))
            except ValueError as e:  # the loop's --seed is this script's --seeds
                msg = "--seeds" + str(e)[len("--seed"):] if str(e).startswith("--seed:") else str(e)
                p.error(msg if len(methods) == 1 else f"{msg} (--methods {m})")
    rows = []
    for m in methods:
        runs = [row for seed in seeds if (row := _train_one(m, seed, a, out, many=len(seeds) > 1)) is not None]
        rows += runs or [{"method": m, "error": "training failed"}]
        if len(runs) > 1:
            rows.append(_mean_row(m, runs))
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"quality_{a.data}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    (out / f"quality_{a.data}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 1 if any(r.get("error") for r in rows) else 0  # a failed training is a failed run


if __name__ == "__main__":
    sys.exit(main())
