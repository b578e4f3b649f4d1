"""``python -m flowmap_kernels.bench fpe``: usage errors for the device, batch, repeats, warm-up runs, backends,
methods and threads (before anything runs), and --quiet silences the profiler's own start/stop lines."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flowmap_kernels.bench.__main__ import main

FAST = ["fpe", "--model", "mlp", "--batch", "4", "--methods", "fm", "--no-time"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "--device: expected cpu, cuda or cuda:N, got 'cuda:x'"),
    (["--device", "cpu:1"], "--device: expected cpu, cuda or cuda:N, got 'cpu:1'"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1, got 0"),
    (["--repeats", "-1"], "--repeats: expected an integer >= 1, got -1"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0, got -1"),
    (["--backends", ""], "--backends: expected comma-separated backend names, got ''"),
    (["--backends", " , "], "--backends: expected comma-separated backend names, got ' , '"),
    (["--threads", "-1"], "--threads: expected an integer >= 0 (0: torch's default), got -1"),
    (["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
    (["--backends", "auto,foo"], "--backends: unknown backend 'foo'; choose from auto, naive"),
    (["--backends", "auto,auto"], "--backends: backend 'auto' given more than once in 'auto,auto'"),
    (["--methods", "foo"], "--methods: unknown method 'foo'; choose from esd, fm"),
    (["--methods", " , "], "--methods: expected comma-separated method names, got ' , '"),
    (["--methods", "fm,tvm,fm"], "--methods: method 'fm' given more than once in 'fm,tvm,fm'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(FAST + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "bench fpe: error:" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(FAST + ["--device", "cuda:0"])
    assert "--device: 'cuda:0' requested but CUDA is not available" in capsys.readouterr().err


def test_warmup_zero_runs(capsys):
    assert main(FAST + ["--backends", "auto", "--warmup", "0", "--repeats", "1", "--no-memory", "--quiet"]) == 0
    assert "fm" in capsys.readouterr().out


def test_quiet_silences_the_profiler():
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    res = subprocess.run([sys.executable, "-m", "flowmap_kernels.bench", *FAST, "--backends", "auto", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "peak mem" in res.stdout
    assert "USDT" not in res.stderr and "profiler_start" not in res.stderr
