"""Scripts under benchmarks/: attention_accuracy.py runs as a plain script (it imports the test suite's
cases), activation_checkpoint.py words a memory increase as "more", every script refuses bad flags with a usage
error (exit status 2) before any work (the GPU scripts: with or without a GPU)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import benchmark_script as _script

ROOT = Path(__file__).resolve().parents[2]


def test_attention_accuracy_runs_as_a_script(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_accuracy.py"), "--help"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--backends" in res.stdout


def test_activation_checkpoint_words_more_and_less():
    versus = _script("activation_checkpoint").versus
    assert versus(470.0, 34.0, 1) == "13.8x less"
    assert versus(100.0, 120.0, 2) == "1.20x more"
    assert versus(100.0, 100.0, 2) == "same" and versus(100.0, 100.4, 2) == "same"
    assert versus(None, 5.0, 1) == "-" and versus(100.0, 0.0, 1) == "-"


@pytest.mark.parametrize("script, argv, message", [
    ("compiled_step", ["--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    ("compiled_step", ["--heads", "3"], "--heads: 3 does not divide --hidden 64"),
    ("compiled_step", ["--input-size", "7"], "--input-size: expected a multiple of the patch size 2, got 7"),
    ("compiled_step", ["--depth", "0"], "--depth: expected an integer >= 1, got 0"),
    ("compiled_step", ["--backend", "nope"], "--backend: unknown torch.compile backend 'nope'; choose from"),
    ("activation_checkpoint", ["--heads", "3"], "--heads: 3 does not divide --hidden 128"),
    ("activation_checkpoint", ["--input-size", "7"], "--input-size: expected a multiple of the patch size 2, got 7"),
    ("activation_checkpoint", ["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
    ("activation_checkpoint", ["--depth", "0"], "--depth: expected an integer >= 1, got 0"),
    ("activation_checkpoint", ["--threads", "0"], "--threads: expected an integer >= 1, got 0"),
    ("attention_memory", ["--sizes", "1024", "-5"], "--sizes: expected integers >= 1, got 1024 -5"),
    ("attention_memory", ["--backends", "torch", "foo"],
     "--backends: unknown backend 'foo'; choose from auto, naive, torch, triton, extension"),
    ("attention_memory", ["--backends", "torch", "torch"], "--backends: backend 'torch' given more than once"),
    ("attention_varlen", ["--lengths", "64", "0"], "--lengths: expected integers >= 1, got 64 0"),
    ("bench_attention_gpu", ["--n", "0"], "--n: expected integers >= 1, got 0"),
    ("bench_attention_gpu", ["--d", "64", "512"], "--d: expected head dims <= 256"),
    ("bench_attention_gpu", ["--math-mem-frac", "-1"], "--math-mem-frac: expected a fraction >= 0"),
    ("bench_attention_gpu", ["--jvp-backward-config", "32x64"], "--jvp-backward-config: expected a name such as"),
    ("cp_comm_volume", ["--world", "2", "--out", "{tmp}"], "is a directory; expected a file path"),
    ("quality_2d", ["--methods", "fm", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
    ("quality_2d", ["--methods", "fm", "--batch", "1"], "--batch: expected an integer >= 2, got 1"),
    ("quality_2d", ["--methods", "fm", "--cond"], "--cond: dataset 'checkerboard' has no labels"),
    ("quality_2d", ["--methods", "fm,tvm", "--seeds", str(2 ** 40)], "--seeds: expected an integer with |seed|"),
    ("quality_2d", ["--methods", "nope"], "--methods: expected comma-separated names from"),
    ("quality_2d", ["--methods", " , "], "--methods: expected comma-separated names from"),
    ("quality_2d", ["--data", "nope"], "--data: unknown dataset 'nope'"),
    ("quality_2d", ["--seeds", "x"], "--seeds: expected comma-separated integers, got 'x'"),
    ("bench_dit_block", ["--out", "{tmp}"], "--out: {tmp} is a directory; expected a file path"),
    # (--repeats 0 used to end in a TypeError after the first measurement)
    ("bench_dit_block", ["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    ("bench_dit_block", ["--batch", "-1"], "--batch: expected an integer >= 1, got -1"),
    ("bench_dit_block", ["--heads", "5"], "--heads: 5 does not divide --hidden 384"),
    ("bench_dit_block", ["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bad_arguments_are_usage_errors(script, argv, message, tmp_path, capsys):
    """Before any work: nothing measured, no subprocess started, nothing written (--out a folder in tmp_path
    where the script writes there)."""
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "o.json" if script in ("compiled_step", "cp_comm_volume") else out)]
    with pytest.raises(SystemExit) as e:
        _script(script).main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.replace("{tmp}", str(tmp_path)) in err and "usage:" in err, err
    assert not any(tmp_path.iterdir())  # nothing written anywhere


def test_attention_memory_refuses_a_backend_that_cannot_run_here(tmp_path, monkeypatch, capsys):
    """Triton on the CPU without its interpreter (this suite turns the interpreter on): refused up front, with
    the registry's reason, not a CalledProcessError from the first subprocess."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit) as e:
        _script("attention_memory").main(["--backends", "torch", "triton", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--backends: 'triton' cannot run here: attention: backend 'triton'" in err, err
    assert not any(tmp_path.iterdir())


def test_attention_accuracy_bad_backend_is_a_usage_error(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_accuracy.py"), "--backends", "torch",
                          "foo", "--out", str(tmp_path / "o")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "--backends: unknown backend 'foo'; choose from auto, naive, torch, triton, extension" in res.stderr
    assert not any(tmp_path.iterdir())

