"""The reference training loop: outputs, exact resume, errors, NaN handling, data parallelism."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.methods import METHODS
from flowmap_kernels.training import allreduce_grads, params_in_sync

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--width", "16", "--depth", "1", "--batch", "32", "--no-progress", "--threads", "1"]


def _run(tmp, *extra):
    return train.main(["--out", str(tmp), *TINY, *extra])


def test_end_to_end_2d_writes_everything(tmp_path):
    assert _run(tmp_path, "--method", "meanflow", "--steps", "6", "--eval-samples", "600") == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["method"] == "meanflow" and m["data"] == "checkerboard" and m["steps"] == 6
    assert m["world_size"] == 1 and m["ranks_in_sync"] is True
    assert m["metric"] == "swd" and m["baseline_noise"] > 0.1 and set(m["nfe"]) == {"1", "2", "4"}
    assert np.isfinite(m["final_loss"]) and m["train_time_s"] > 0 and m["wall_time_s"] >= m["train_time_s"]
    assert np.load(tmp_path / "reference.npy").shape == (600, 2)
    for k in (1, 2, 4):
        assert np.load(tmp_path / f"samples_nfe{k}.npy").shape == (600, 2)
    for f in ("loss_curve.png", "samples.png", "checkpoint.pt"):
        assert (tmp_path / f).stat().st_size > 1000
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 6 and len(ck["losses"]) == 6


def test_2d_presets_apply_and_yield_to_cfg_and_no_preset(tmp_path):
    """MeanFlow on 2D data takes PRESETS_2D (uniform times, adaptive c = 1, the batch's marginal velocity,
    no clipping, time frequencies <= 12); --cfg and explicit flags win over it, --no-preset turns it off, and image
    data never gets it."""
    def cfg(name, *extra):
        assert _run(tmp_path / name, "--method", "meanflow", "--steps", "1", "--no-eval", *extra) == 0
        return json.loads((tmp_path / name / "metrics.json").read_text())
    m = cfg("preset")
    assert m["method_cfg"]["adaptive_c"] == 1.0 and m["method_cfg"]["time_dist"] == "uniform" and m["grad_clip"] == 0.0
    assert m["time_freq"] == 12.0 and m["method_cfg"]["velocity"] == "batch"
    assert cfg("cfg", "--cfg", "adaptive_c=0.5")["method_cfg"]["adaptive_c"] == 0.5
    flags = cfg("flags", "--time-freq", "8", "--grad-clip", "2")
    assert flags["time_freq"] == 8.0 and flags["grad_clip"] == 2.0 and flags["method_cfg"]["adaptive_c"] == 1.0
    off = cfg("off", "--no-preset")
    assert off["time_freq"] == 32.0 and cfg("tvm", "--method", "tvm")["time_freq"] == 32.0
    assert off["method_cfg"] == cfg("digits", "--data", "digits", "--model", "mlp")["method_cfg"]
    assert off["method_cfg"]["adaptive_c"] == METHODS["meanflow"].DEFAULTS["adaptive_c"] and off["grad_clip"] == 1.0
    assert off["method_cfg"]["velocity"] == "conditional"


def test_fm_euler_step_counts_and_digits_grid(tmp_path):
    assert _run(tmp_path / "fm", "--method", "fm", "--steps", "3", "--eval-samples", "300") == 0
    m = json.loads((tmp_path / "fm" / "metrics.json").read_text())
    assert m["sampler"] == "euler" and list(m["nfe"]) == ["1", "2", "4", "8", "16", "32", "64"]
    assert _run(tmp_path / "dg", "--method", "shortcut", "--data", "digits", "--model", "mlp", "--steps", "3",
                "--eval-samples", "300", "--cond") == 0
    m = json.loads((tmp_path / "dg" / "metrics.json").read_text())
    assert m["metric"] == "fd" and m["nfe"]["1"]["ema"] > 0
    fd = m["fd_features"]  # the shipped extractor's Frechet distance beside the raw-pixel one
    assert 0 <= fd["data_vs_data"] < 0.1 * fd["baseline_noise"]
    assert m["nfe"]["1"]["fd_features_ema"] > fd["data_vs_data"]
    assert 0 <= m["nfe"]["1"]["class_accuracy_ema"] <= 1 and len(m["nfe"]["1"]["class_accuracy_per_class_ema"]) == 10
    assert (tmp_path / "dg" / "samples_nfe1.png").stat().st_size > 1000


@pytest.mark.parametrize("method", sorted(METHODS))
def test_latent_digits_dit_trains_every_method(tmp_path, method):
    """The latent image path: the DiT on the shipped autoencoder's latents (2x4x4), every method; the
    samples are decoded to pixels and compared with the digits (the autoencoder's own floor reported)."""
    evaluate = method == "tvm"
    args = ["--method", method, "--data", "digits_latent", "--model", "dit", "--batch", "16", "--steps", "2"]
    assert _run(tmp_path, *args, *(["--eval-samples", "300", "--cond"] if evaluate else ["--no-eval"])) == 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and all(np.isfinite(ck["losses"]))
    if evaluate:
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert m["data"] == "digits_latent" and m["metric"] == "fd"
        floor = m["autoencoder_floor"]
        assert m["data_vs_data"] <= floor["fd"] < 0.1 * m["baseline_noise"]  # pixels: blur costs a little
        assert floor["fd_features"] < 2 * m["fd_features"]["data_vs_data"] < m["fd_features"]["baseline_noise"]
        assert (tmp_path / "samples_nfe1.png").stat().st_size > 1000  # decoded 8x8 digits


def _final(tmp):
    ck = torch.load(Path(tmp) / "checkpoint.pt", weights_only=True)
    return ck


@pytest.mark.parametrize("method,schedule", [("tvm", "cosine"), ("meanflow", "constant"), ("shortcut", "cosine")])
def test_resume_continues_bit_for_bit(tmp_path, method, schedule):
    """2N steps in one go == N steps, then --resume to 2N: same losses, parameters, EMA, optimizer.
    The cosine schedule depends on --steps, so its first part stops early with --stop-after."""
    common = ["--method", method, "--no-eval", "--ckpt-every", "3", "--lr-schedule", schedule]
    assert _run(tmp_path / "full", *common, "--steps", "8") == 0
    if schedule == "constant":
        assert _run(tmp_path / "part", *common, "--steps", "4") == 0
    else:
        assert _run(tmp_path / "part", *common, "--steps", "8", "--stop-after", "4") == 0
    assert _final(tmp_path / "part")["step"] == 4
    assert _run(tmp_path / "part", *common, "--steps", "8", "--resume") == 0
    a, b = _final(tmp_path / "full"), _final(tmp_path / "part")
    assert a["losses"] == b["losses"] and len(a["losses"]) == 8
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]) for k in a["ema"]["module"])
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert all(torch.equal(sa[i][n], sb[i][n]) for i in sa for n in sa[i])
    # and a run that is NOT resumed from the same state diverges (the comparison can fail)
    assert _run(tmp_path / "other", *common, "--steps", "8", "--seed", "1") == 0
    assert _final(tmp_path / "other")["losses"] != a["losses"]


def test_cli_errors(tmp_path, capsys):
    assert _run(tmp_path, "--method", "nope") == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert _run(tmp_path, "--data", "mnist") == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(blocker / "sub", "--steps", "1") == 2
    assert "--out: cannot write" in capsys.readouterr().err
    assert _run(tmp_path / "fresh", "--steps", "1", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert _run(tmp_path, "--cfg", "lr=3") == 2
    assert "has no setting 'lr'" in capsys.readouterr().err


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def nan_after_5(model, x0, *, cond=None, **cfg):
        calls["n"] += 1
        lo = (model(x0, torch.ones(len(x0)), torch.ones(len(x0))) ** 2).mean()
        return (lo * float("nan") if calls["n"] == 6 else lo), {"loss": lo.detach()}
    fake = types.SimpleNamespace(NAME="nanny", NOMINAL_FPE=3, CALLS="F + B", DEFAULTS={"generator": None},
                                 TEACHER=None, SAMPLER="flowmap", loss=nan_after_5)
    monkeypatch.setitem(METHODS, "nanny", fake)
    assert _run(tmp_path, "--method", "nanny", "--steps", "10", "--ckpt-every", "4") == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 6" in err and "(step 4)" in err
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not (tmp_path / "metrics.json").exists()


def _worker(rank, world):
    import torch.distributed as dist
    from flowmap_kernels.training import close_distributed, init_distributed
    info = init_distributed("cpu")  # from the torchrun-style environment the harness sets
    assert info.enabled and info.rank == rank and dist.is_initialized()
    m = torch.nn.Linear(3, 2)
    for i, p in enumerate(m.parameters()):
        p.grad = torch.full_like(p, float(rank + 1 + i)) if i == 0 else None  # bias grad missing
    calls = allreduce_grads(m.parameters(), world, bucket_bytes=8)
    w, b = m.weight.grad.clone(), m.bias.grad.clone()
    same = params_in_sync(m)  # independently initialised: differ
    from flowmap_kernels.training import broadcast_module
    broadcast_module(m)
    synced = params_in_sync(m)
    close_distributed()  # the group init_distributed created: left after a barrier
    return rank, calls, w.unique().tolist(), b.unique().tolist(), same, synced, dist.is_initialized()


def test_allreduce_grads_averages_and_sync_check(tmp_path):
    from tests.distributed.harness import spawn
    res = spawn(_worker, 2, tmp_path, timeout=120, group=False, all_ranks=True)
    assert [r[0] for r in res] == [0, 1]
    for rank, calls, w, b, same_before, same_after, still_initialized in res:
        assert w == [1.5] and b == [0.0]  # mean of 1 and 2; a missing grad counts as zero
        assert calls == 2  # bucket_bytes=8 forces one all_reduce per tensor
        assert same_before is False and same_after is True
        assert still_initialized is False


def test_close_distributed_leaves_a_callers_group_alone():
    import torch.distributed as dist
    from flowmap_kernels.training import close_distributed
    close_distributed()  # no group at all: nothing to do
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        close_distributed()
        assert dist.is_initialized()  # not created by init_distributed: not ours to destroy
    finally:
        dist.destroy_process_group()


def test_torchrun_two_processes_tvm_stays_in_sync(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flowmap_kernels.train", "--method", "tvm", "--steps", "4", "--out", str(tmp_path), *TINY,
           "--eval-samples", "500", "--ckpt-every", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["ranks_in_sync"] is True and m["method"] == "tvm"
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["data"], ck["rng"][1]["data"])  # per-rank data streams


def test_torchrun_resume_is_exact_per_rank(tmp_path):
    """Data-parallel resume restores every rank's RNG streams: 6 steps == 3 steps + --resume to 6."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "flowmap_kernels.train", "--method", "tvm", "--steps", "6", *TINY, "--no-eval", "--ckpt-every", "2"]
    for extra in (["--out", str(tmp_path / "a")], ["--out", str(tmp_path / "b"), "--stop-after", "3"],
                  ["--out", str(tmp_path / "b"), "--resume"]):
        r = subprocess.run(base + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert a["step"] == b["step"] == 6 and a["losses"] == b["losses"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
