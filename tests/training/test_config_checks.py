"""Training CLI: flags checked at config resolution (before any training step, exit 2 with `error: --flag`)
instead of failing mid-run or after training; flags that have no effect in a run are reported
(`warning: --flag`); the --resume messages."""
from __future__ import annotations

import json

import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.training import loop

from .cli import TINY
from .cli import fails_upfront as _fails_upfront
from .cli import run as _run

GUIDED = ["--data", "moons", "--cond", "--cfg-dropout", "0.1"]


def _cfg(*extra):
    return train.resolve_config(train.build_parser().parse_args(["--out", "unused", *TINY, *extra]))


# ---- guidance: decided at config resolution, not after training ------------------------------------------

@pytest.mark.parametrize("method,key", [("tvm", "cfg_scale_range"), ("imf", "cfg_omega_max")])
def test_guidance_scale_needs_the_methods_guidance_input(tmp_path, capsys, method, key):
    """tvm / imf sample with the guidance scale as a model input: --guidance-scale without the setting that
    trains that input failed after the whole run ('scaled_input' needs a model with a guidance input)."""
    err = _fails_upfront(tmp_path, capsys, ["--method", method, *GUIDED, "--guidance-scale", "2"], "--guidance-scale:")
    assert f"--cfg {key}=" in err, err
    value = "[1,4]" if key == "cfg_scale_range" else "3"
    cfg = _cfg("--method", method, *GUIDED, "--guidance-scale", "2", "--cfg", f"{key}={value}")
    model = loop.build_model(cfg, loop.get_dataset("moons"))
    assert model.guidance_dim >= 1 and model.null_label is not None and cfg.warnings == ()


def test_tvm_trains_and_evaluates_with_guidance(tmp_path):
    out = tmp_path / "tvm"
    assert train.main(["--method", "tvm", *GUIDED, "--guidance-scale", "2", "--cfg", "cfg_scale_range=[1,4]",
                       "--steps", "2", "--batch", "16", "--width", "16", "--depth", "1", "--eval-samples", "100",
                       "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["guidance"]["scale"] == 2.0 and m["guidance"]["mode"] == "scaled_input"


@pytest.mark.parametrize("method,extra", [("tvm", ["--cfg", "cfg_scale_range=[1,4]"]),
                                          ("imf", ["--cfg", "cfg_omega_max=3"])])
def test_guidance_scale_zero_is_refused_where_the_scale_is_a_model_input(tmp_path, capsys, method, extra):
    err = _fails_upfront(tmp_path, capsys, ["--method", method, *GUIDED, *extra, "--guidance-scale", "0"],
                         "--guidance-scale:")
    assert "> 0" in err
    assert _cfg("--method", "meanflow", *GUIDED, "--guidance-scale", "0").guidance_scale == 0.0  # cfg: unconditional


@pytest.mark.parametrize("dropout", [[], ["--cfg-dropout", "0"], ["--cfg", "cfg_dropout=0"]])
def test_guidance_scale_needs_label_dropout(tmp_path, capsys, dropout):
    """The null class that guided sampling (and tvm / imf's guided targets) use is trained only by label
    dropout: without it the guided samples use an untrained embedding."""
    flags = ["--method", "meanflow", "--data", "moons", "--cond", *dropout, "--guidance-scale", "2"]
    err = _fails_upfront(tmp_path, capsys, flags, "--cfg-dropout:")
    assert "null class" in err
    _fails_upfront(tmp_path, capsys, ["--method", "tvm", "--data", "moons", "--cond", *dropout,
                                      "--cfg", "cfg_scale_range=[1,4]", "--guidance-scale", "2"], "--cfg-dropout:")
    # scale 1 with the standard combination is unguided sampling: nothing to train for it
    assert _cfg("--method", "meanflow", "--data", "moons", "--cond", *dropout, "--guidance-scale", "1")


def test_a_guidance_scale_outside_the_trained_range_is_reported():
    cfg = _cfg("--method", "imf", *GUIDED, "--cfg", "cfg_omega_max=3", "--guidance-scale", "9")
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith("--guidance-scale 9:") and "[1, 4]" in cfg.warnings[0]
    assert _cfg("--method", "tvm", *GUIDED, "--cfg", "cfg_scale_range=[1,4]", "--guidance-scale", "3").warnings == ()
    assert _cfg("--method", "tvm", *GUIDED, "--cfg", "cfg_scale=2", "--guidance-scale", "3").warnings


# ---- --backend against the device -----------------------------------------------------------------------

def test_backend_triton_is_checked_against_the_device(tmp_path, capsys, monkeypatch):
    """Named explicitly, Triton runs CUDA tensors, or CPU tensors in its interpreter (TRITON_INTERPRET=1,
    which the test suite sets); it failed mid-run with BackendUnavailableError."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    err = _fails_upfront(tmp_path, capsys, ["--data", "digits", "--model", "dit", "--backend", "triton"],
                         "--backend triton:")
    assert "CUDA" in err and "Traceback" not in err
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _cfg("--data", "digits", "--model", "dit", "--backend", "triton").warnings == ()
    assert _cfg("--data", "digits", "--model", "dit", "--backend", "naive").warnings == ()


@pytest.mark.parametrize("backend", ["triton", "naive"])
def test_backend_on_the_mlp_is_reported_as_without_effect(monkeypatch, backend):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (note,) = _cfg("--backend", backend).warnings
    assert note.startswith(f"--backend {backend}:") and "MLP" in note


# ---- non-finite and out-of-range values ------------------------------------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--grad-clip", "inf"], "--grad-clip"),
    (["--time-freq", "inf"], "--time-freq"),
    (["--method", "meanflow", *GUIDED, "--guidance-scale", "inf"], "--guidance-scale"),
    (["--cfg", "fm_time_mu=NaN"], "--cfg fm_time_mu"), (["--cfg", "lag_weight=NaN"], "--cfg lag_weight"),
    (["--cfg", "time_mu=Infinity"], "--cfg time_mu"), (["--cfg", "gap_mu=1e999"], "--cfg gap_mu"),
    (["--cfg", "cfg_scale_range=[1,Infinity]"], "--cfg cfg_scale_range"),
    (["--cfg", "lag_weight=-1"], "--cfg lag_weight"), (["--cfg", "gap_sigma=-1"], "--cfg gap_sigma"),
    (["--cfg", "fm_time_sigma=0"], "--cfg fm_time_sigma"), (["--cfg", "cfg_scale=0"], "--cfg cfg_scale"),
    (["--cfg", "cfg_scale_range=[0,4]"], "--cfg cfg_scale_range"),
    (["--method", "meanflow", "--cfg", "cfg_interval=[0.5,0.2]"], "--cfg cfg_interval"),
    (["--method", "shortcut", "--cfg", "base_steps=3"], "--cfg base_steps"),
    (["--method", "scm", "--cfg", "tangent_c=0"], "--cfg tangent_c"),
    (["--cfg", "adaptive_c=0", "--cfg", "adaptive_p=1"], "--cfg adaptive_c"),
    (["--method", "meanflow", "--cfg", "adaptive_c=0"], "--cfg adaptive_c")])
def test_non_finite_and_out_of_range_values_fail_upfront(tmp_path, capsys, flags, named):
    """These trained until the loss was NaN ("non-finite loss at step 1") or were accepted (--lr inf)."""
    _fails_upfront(tmp_path, capsys, flags, named + ":")


def test_adaptive_c_zero_is_what_made_the_loss_nan():
    """adaptive_c = 0 with adaptive_p > 0: the weight sg[1 / (err + c)^p] of an exactly fitted example is
    1/0 (the zero-initialised output layer fits TVM's first Lagrangian residual exactly): 0 * inf = NaN."""
    from flowmap_kernels.methods import get_method
    from flowmap_kernels.models import MLPFlowMap
    torch.manual_seed(0)
    model, x0 = MLPFlowMap((2,), hidden=16, depth=1), torch.randn(16, 2)
    loss, _ = get_method("tvm").loss(model, x0, adaptive_c=0.0, adaptive_p=1.0, time_dist="uniform")
    assert not torch.isfinite(loss)
    # still accepted: c = 0 without weighting, and a fixed gap (gap_sigma 0)
    assert _cfg("--cfg", "adaptive_c=0", "--cfg", "gap_sigma=0").method_cfg["adaptive_c"] == 0.0


@pytest.mark.parametrize("method,setting", [("meanflow", "cfg_scale=2"), ("meanflow", "cfg_kappa=0.5"),
                                            ("imf", "cfg_omega_max=3"), ("tvm", "cfg_scale=2"),
                                            ("tvm", "cfg_scale_range=[1,4]")])
def test_a_guided_target_needs_label_dropout_and_labels(tmp_path, capsys, method, setting):
    """The guided targets mix in the model's null-class output, which only label dropout trains: without it the
    run trained against an embedding row that never gets a gradient; without --cond the setting did nothing,
    silently."""
    flags = ["--method", method, "--cfg", setting]
    _fails_upfront(tmp_path, capsys, [*flags, "--data", "moons", "--cond"], "--cfg-dropout:")
    _fails_upfront(tmp_path, capsys, [*flags, "--data", "moons", "--cond", "--cfg-dropout", "0"], "--cfg-dropout:")
    assert _cfg(*flags, *GUIDED).warnings == ()
    (note,) = _cfg(*flags, "--data", "moons").warnings
    assert note.startswith(f"--cfg {setting.split('=')[0]}=") and "has no effect without --cond" in note, note


# ---- flags without effect ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,named", [
    (["--method", "fm", "--teacher", "ema"], "--teacher ema:"),
    (["--method", "meanflow", "--teacher", "self"], "--teacher self:"),
    (["--activation-checkpointing", "blocks"], "--activation-checkpointing blocks:"),
    (["--no-reshard-after-forward"], "--no-reshard-after-forward:"),
    (["--cp-mode", "ulysses"], "--cp-mode ulysses:"),
    (["--guidance-interval", "0.2", "1"], "--guidance-interval:")])
def test_flags_without_effect_are_reported(flags, named):
    (note,) = _cfg(*flags).warnings
    assert note.startswith(named), note
    assert "warnings" not in _cfg(*flags).record()  # not a setting: neither stored nor compared on --resume


def test_applicable_flags_are_not_reported():
    assert _cfg("--method", "tvm", "--teacher", "self").warnings == ()
    assert _cfg("--method", "lsd", "--teacher", "ema").warnings == ()
    assert _cfg().warnings == ()


def test_the_cli_prints_the_warnings(tmp_path, capsys):
    assert _run(tmp_path, "--method", "fm", "--teacher", "ema", "--steps", "1") == 0
    err = capsys.readouterr().err
    assert "warning: --teacher ema: has no effect with --method fm" in err, err


# ---- --resume messages ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "unsafe-pickle"])
def test_an_unreadable_checkpoint_is_named_without_torchs_hint(tmp_path, capsys, kind):
    """torch.load's message for a file it cannot load with weights_only=True suggests weights_only=False
    (which runs the code a pickle holds): the error says only that the file is not a valid checkpoint."""
    import fractions
    import os
    path = tmp_path / "checkpoint.pt"
    if kind == "unsafe-pickle":
        torch.save({"step": fractions.Fraction(1, 3)}, path)  # a global weights_only refuses
    elif kind == "truncated":
        torch.save({"step": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(b"" if kind == "empty" else os.urandom(4096))
    assert _run(tmp_path, "--steps", "2", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume: {path} is not a valid checkpoint"), err
    assert "weights_only" not in err and "Re-running" not in err, err


def test_stop_then_resume_reports_no_changed_flag(tmp_path, capsys):
    """The documented workflow: --stop-after N, then --resume without it; --stop-after is where one
    invocation ends, not a setting of the run."""
    assert _run(tmp_path, "--steps", "4", "--stop-after", "2") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--steps", "4", "--resume") == 0
    assert "warning" not in capsys.readouterr().err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 4
    out = tmp_path / "b"
    assert _run(out, "--steps", "4", "--stop-after", "2") == 0
    capsys.readouterr()
    assert _run(out, "--steps", "4", "--stop-after", "3", "--resume", "--lr", "0.001") == 0
    err = capsys.readouterr().err
    assert "--lr 0.002 -> 0.001" in err and "--stop-after" not in err, err
