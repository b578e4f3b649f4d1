"""Training CLI reliability: --resume checks the checkpoint's flags and contents, --out is not overwritten
without --overwrite, invalid flags fail before any work (exit 2, `error: ...` naming the flag), and the
fpe benchmark checks its output paths before running."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from flowmap_kernels import train

from .cli import fails_upfront
from .cli import run as _run


def _snapshot(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder (to prove nothing was written)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step MLP run (tvm, checkerboard) with its checkpoint.pt."""
    out = tmp_path_factory.mktemp("trained")
    assert _run(out, "--steps", "4", "--ckpt-every", "2") == 0
    return out


@pytest.mark.parametrize("flags,named", [(["--width", "32"], "--width"), (["--depth", "2"], "--depth"),
                                         (["--time-freq", "8"], "--time-freq"), (["--method", "lsd"], "--method"),
                                         (["--data", "moons"], "--data")])
def test_resume_refuses_a_different_model(trained, capsys, flags, named):
    before = _snapshot(trained)
    assert _run(trained, "--steps", "6", "--resume", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and named in err and "defines the model" in err, err
    assert _snapshot(trained) == before


def test_resume_reports_changed_flags_and_applies_them(tmp_path, capsys):
    assert _run(tmp_path, "--steps", "2") == 0
    capsys.readouterr()
    assert _run(tmp_path, "--steps", "3", "--resume", "--lr", "0.001", "--ema-decay", "0.9",
                "--cfg", "adaptive_c=0.5") == 0
    err = capsys.readouterr().err
    assert "warning: --resume: flags changed" in err
    for change in ("--lr 0.002 -> 0.001", "--ema-decay 0.995 -> 0.9", "--steps 2 -> 3",
                   # TVM's 2D preset (PRESETS_2D) is in the method config on both sides
                   "--cfg {'time_dist': 'uniform', 'fm_time_mu': 0.0} -> {'time_dist': 'uniform', 'fm_time_mu': 0.0, "
                   "'adaptive_c': 0.5}"):
        assert change in err, (change, err)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and ck["ema"]["decay"] == 0.9 and ck["opt"]["param_groups"][0]["lr"] == 0.001
    assert _run(tmp_path, "--steps", "3", "--resume", "--lr", "0.001", "--ema-decay", "0.9",
                "--cfg", "adaptive_c=0.5") == 0
    assert "warning" not in capsys.readouterr().err  # nothing changed: nothing reported


def test_out_with_a_checkpoint_needs_resume_or_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(out, "--steps", "2") == 0
    before = _snapshot(out)
    assert _run(out, "--steps", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out:") and "--overwrite" in err and "checkpoint.pt" in err
    assert _snapshot(out) == before
    assert _run(out, "--steps", "3", "--overwrite") == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3


def _bad_checkpoints(good: Path):
    raw = good.read_bytes()
    ck = torch.load(good, weights_only=True)
    torch.manual_seed(0)
    from flowmap_kernels.models import MLPFlowMap
    wrong = dict(ck, model=MLPFlowMap((2,), hidden=8, depth=1).state_dict())  # same flags, other shapes
    rng = [{k: v for k, v in r.items() if k != "torch"} for r in ck["rng"]]
    return {"truncated": raw[: len(raw) // 2], "empty": b"", "random": os.urandom(4096),
            "not-a-checkpoint": {"weights": torch.zeros(3)}, "other-shape": wrong,
            # the right keys, other contents (a KeyError / int() traceback before)
            "step-not-a-number": dict(ck, step="x"), "rng-without-torch": dict(ck, rng=rng),
            "losses-not-a-list": dict(ck, losses=3.0)}


def test_resume_rejects_bad_checkpoint_files(trained, tmp_path, capsys):
    for name, content in _bad_checkpoints(trained / "checkpoint.pt").items():
        out = tmp_path / name
        out.mkdir()
        if isinstance(content, bytes):
            (out / "checkpoint.pt").write_bytes(content)
        else:
            torch.save(content, out / "checkpoint.pt")
        before = _snapshot(out)
        assert _run(out, "--steps", "6", "--resume") == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: --resume:") and str(out / "checkpoint.pt") in err, (name, err)
        assert "warning" not in err  # changed flags are reported only for a checkpoint that loads
        assert _snapshot(out) == before, name


def test_resume_rejects_steps_below_the_checkpoint(trained, capsys):
    before = _snapshot(trained)
    assert _run(trained, "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --steps: 3 is below the step 4"), err
    assert _snapshot(trained) == before


@pytest.mark.parametrize("flags,named", [
    (["--ckpt-every", "0"], "--ckpt-every"), (["--width", "0"], "--width"), (["--width", "-3"], "--width"),
    (["--depth", "-1"], "--depth"), (["--steps", "0"], "--steps"), (["--batch", "0"], "--batch"),
    (["--batch", "-4"], "--batch"), (["--lr", "0"], "--lr"), (["--ema-decay", "1"], "--ema-decay"),
    (["--eval-samples", "1"], "--eval-samples"), (["--grad-clip", "-1"], "--grad-clip"),
    (["--threads", "-1"], "--threads"), (["--stop-after", "-1"], "--stop-after"),
    (["--cfg", "nope=1"], "--cfg"), (["--cfg", "ratio_neq=abc"], "--cfg ratio_neq"),
    (["--cfg", "time_dist=3"], "--cfg time_dist"), (["--cfg", "adaptive_p=true"], "--cfg adaptive_p"),
    (["--cfg", "ratio_neq"], "--cfg"), (["--dp-shard", "0"], "--dp-shard"), (["--cp", "2"], "--cp"),
    (["--dp-replicate", "2"], "--dp-replicate"), (["--mixed-precision", "bf16"], "--mixed-precision"),
    (["--dp-shard", "1", "--cp", "2"], "--cp"), (["--backend", "nope"], "--backend"),
    (["--cfg-dropout", "0.1"], "--cfg-dropout"),
    (["--cond", "--data", "moons", "--cfg-dropout", "1.5"], "--cfg-dropout")])
def test_invalid_flags_fail_before_any_work(tmp_path, capsys, flags, named):
    fails_upfront(tmp_path, capsys, flags, named)


@pytest.mark.parametrize("flags,named", [
    (["--cfg", "time_dist=foo"], "--cfg time_dist"), (["--cfg", "fm_time_dist=x"], "--cfg fm_time_dist"),
    (["--method", "fm", "--cfg", "time_dist=normal"], "--cfg time_dist"),
    (["--method", "lsd", "--cfg", "time_dist=tvm"], "--cfg time_dist"),
    (["--method", "psd", "--cfg", "time_dist=foo"], "--cfg time_dist"),
    (["--method", "tvm", "--no-preset", "--cfg", "ratio_neq=0.5"], "--cfg ratio_neq"),
    (["--method", "meanflow", "--cfg", "velocity=foo"], "--cfg velocity"),
    (["--method", "meanflow", "--cfg", "adaptive_reduce=foo"], "--cfg adaptive_reduce"),
    (["--method", "scm", "--cfg", "param=foo"], "--cfg param"),
    (["--seed", str(2 ** 64)], "--seed"), (["--method", "nope"], "--method"), (["--data", "nope"], "--data"),
    (["--resume"], "--resume")])
def test_bad_values_found_at_the_first_step_before_now_fail_upfront(tmp_path, capsys, flags, named):
    """These created --out and failed at the first step with the loss's message ("time_dist: expected ...", no
    flag named; "Overflow when unpacking long long" for the seed; --resume left an empty folder behind)."""
    fails_upfront(tmp_path, capsys, flags, named + ":")


@pytest.mark.parametrize("flags", [["--method", "tvm", "--cfg", "time_dist=tvm"], ["--method", "lsd", "--cfg",
                                   "time_dist=logit_normal"], ["--method", "scm", "--cfg", "param=trigflow"],
                                   ["--seed", "-1"]])
def test_valid_string_settings_still_resolve(flags):
    from flowmap_kernels.training.config import resolve_config
    resolve_config(train.build_parser().parse_args([*flags, "--out", "unused"]))


def test_int_cfg_values_are_checked_and_converted(tmp_path):
    from flowmap_kernels.methods import get_method
    from flowmap_kernels.training.config import method_cfg_from_items
    shortcut, meanflow = get_method("shortcut"), get_method("meanflow")
    assert method_cfg_from_items(shortcut, ["base_steps=64"]) == {"base_steps": 64}
    assert method_cfg_from_items(shortcut, ["base_steps=64.0"]) == {"base_steps": 64}
    with pytest.raises(ValueError, match="--cfg base_steps: expected a int"):
        method_cfg_from_items(shortcut, ["base_steps=2.5"])
    assert method_cfg_from_items(meanflow, ["adaptive_c=1", "time_dist=uniform"]) == {"adaptive_c": 1.0,
                                                                                       "time_dist": "uniform"}


def test_fpe_checks_output_paths_before_the_run(tmp_path, monkeypatch, capsys):
    from flowmap_kernels.bench import __main__ as bench_main
    from flowmap_kernels.bench import fpe

    def never(**kw):
        raise AssertionError("run_fpe ran before the output paths were checked")
    monkeypatch.setattr(fpe, "run_fpe", never)
    base = ["fpe", "--model", "mlp", "--no-time", "--no-memory", "--quiet"]
    cases = [(["--json", str(tmp_path / "missing" / "o.json")], "--json: folder"),
             (["--csv", str(tmp_path)], "--csv: expected a file path"),
             (["--plot", str(tmp_path / "a.png"), "--markdown", str(tmp_path / "a.png")], "--markdown: same file"),
             (["--json", ""], "--json: expected a file path")]
    for extra, msg in cases:
        assert bench_main.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"error: {msg}"), (extra, err)
    assert list(tmp_path.iterdir()) == []
    fpe.check_output_paths({"--json": str(tmp_path / "ok.json"), "--csv": None})  # a writable new file is fine


def test_resume_refuses_a_model_defining_method_setting(tmp_path, capsys):
    """sCM's adaptive_weighting adds a learned loss-weight module to the model: a --cfg that changes it
    cannot continue the checkpoint."""
    # --no-preset: the 2D preset turns the learned weighting off (PRESETS_2D), sCM's DEFAULTS have it on
    assert _run(tmp_path, "--method", "scm", "--steps", "2", "--no-preset") == 0
    before = _snapshot(tmp_path)
    assert _run(tmp_path, "--method", "scm", "--steps", "3", "--resume", "--no-preset", "--cfg",
                "adaptive_weighting=false") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume:") and "--cfg adaptive_weighting=False" in err, err
    assert _snapshot(tmp_path) == before
    assert _run(tmp_path, "--method", "scm", "--steps", "3", "--resume", "--no-preset") == 0


@pytest.mark.parametrize("first,resumed,named", [
    (["--cfg-dropout", "0.1"], ["--cfg-dropout", "0"], "null_class True"),
    ([], ["--guidance-scale", "1"], "null_class False"),
    (["--method", "tvm", "--cfg-dropout", "0.1", "--cfg", "cfg_scale=2"], ["--method", "tvm", "--cfg-dropout", "0.1"],
     "guidance_dim 1")])
def test_resume_refuses_settings_that_change_the_network(tmp_path, capsys, first, resumed, named):
    """Label dropout, --guidance-scale and guidance inputs add rows and inputs to the labelled MLP: a resume that
    changes them fails before loading, naming what changed (it was torch's state_dict size mismatch)."""
    base = ["--data", "moons", "--cond"]
    method = [] if "--method" in first else ["--method", "meanflow"]
    assert _run(tmp_path, *method, *base, "--steps", "2", *first) == 0
    capsys.readouterr()
    before = _snapshot(tmp_path)
    assert _run(tmp_path, *method, *base, "--steps", "3", "--resume", *resumed) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint's network was built with " + named), err
    assert _snapshot(tmp_path) == before
    assert _run(tmp_path, *method, *base, "--steps", "3", "--resume", *first) == 0


def test_cfg_dropout_flag_sets_the_methods_label_dropout():
    from flowmap_kernels.training.config import resolve_config
    args = train.build_parser().parse_args(["--method", "meanflow", "--data", "moons", "--cond",
                                            "--cfg-dropout", "0.2", "--out", "unused"])
    assert resolve_config(args).method_cfg["cfg_dropout"] == 0.2
