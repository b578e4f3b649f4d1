"""Scripts under benchmarks/: attention_accuracy.py runs as a plain script (it imports the test suite's
cases), activation_checkpoint.py words a memory increase as "more", bench_dit_block.py refuses bad flags."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    (["--batch", "-1"], "--batch: expected an integer >= 1, got -1"),
    (["--heads", "5"], "--heads: 5 does not divide --hidden 384"),
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
])
def test_bench_dit_block_bad_arguments_are_usage_errors(argv, message, tmp_path, capsys):
    """Before the run (--repeats 0 used to end in a TypeError after the first measurement)."""
    with pytest.raises(SystemExit) as e:
        _script("bench_dit_block").main(argv + ["--out", str(tmp_path / "o")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
