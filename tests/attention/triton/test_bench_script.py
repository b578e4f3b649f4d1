"""The GPU benchmark script runs on a machine without a GPU: it says so and exits 0 (no numbers)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_bench_attention_gpu_without_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():  # on a GPU machine the script really benchmarks; not a unit test then
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention_gpu.py"), "--out",
                          str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "No CUDA GPU" in res.stdout
    assert not list(tmp_path.iterdir())  # nothing written


def test_flop_factors_match_the_custom_op_formulas():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_attention_gpu as b
    finally:
        sys.path.pop(0)
    from flowmap_kernels.attention.kernels import product_flops
    q = k = v = (2, 3, 128, 64)
    n_products = {"forward": (1, 1), "backward": (2, 2), "jvp_forward": (3, 3), "jvp_backward": (6, 6)}
    for kind, (a, c) in n_products.items():
        assert product_flops(q, k, v, a, c) == b.FLOP_FACTOR[kind] * 2 * 3 * 128 * 128 * 64


def _import_benchmark(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_executed_flops_count_recomputation():
    b = _import_benchmark("bench_attention_gpu")
    assert b.executed_factor("sdpa_flash", "backward", 64, "bf16") == 2.5 * b.FLOP_FACTOR["forward"]
    assert b.executed_factor("triton", "backward", 64, "bf16") == 10  # one pass: 5 products, as FA2
    assert b.executed_factor("triton", "jvp_backward", 64, "bf16") == 30  # 15 products, the minimum
    assert b.executed_factor("triton", "jvp_backward", 128, "bf16") == 40
    assert b.executed_factor("triton", "backward", 64, "bf16", deterministic=True) == 14
    assert b.executed_factor("triton", "jvp_backward", 64, "bf16", deterministic=True) == 42
    assert b.executed_factor("triton", "jvp_backward", 128, "bf16", deterministic=True) == 56
    assert b.executed_factor("triton", "jvp_forward", 128, "bf16") == b.FLOP_FACTOR["jvp_forward"]


def test_gpu_check_without_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        return
    for cmd in (["bash", str(ROOT / "scripts" / "gpu_check.sh")],
                [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "g.json")]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "no numbers were produced" in res.stdout or "nothing was measured" in res.stdout
    assert not list(tmp_path.iterdir())


def test_gpu_check_ratios():
    g = _import_benchmark("gpu_check")
    rows = [dict(n=4096, d=64, impl="sdpa_flash", pass_="forward", ms=1.0),
            dict(n=4096, d=64, impl="sdpa_flash", pass_="backward", ms=2.5),
            dict(n=4096, d=64, impl="triton", pass_="jvp_forward", ms=1.5),
            dict(n=4096, d=64, impl="triton", pass_="jvp_backward", ms=10.0),
            dict(n=4096, d=64, impl="triton[32x64/w4/s2/split2]", pass_="jvp_backward", ms=7.5)]
    (r,) = g.ratios(rows)
    assert r["jvp_forward_over_flash_forward"] == 1.5 and r["jvp_backward_over_flash_backward"] == 4.0
    assert r["jvp_backward_alternatives_over_flash_backward"] == {"32x64/w4/s2/split2": 3.0}
    # the alternatives it times are valid launch configs
    from flowmap_kernels.attention.triton import configs
    assert all(str(configs.Config.parse(c)) == c for cs in g.ALTERNATIVES.values() for c in cs)


def test_bench_rejects_a_bad_launch_config(capsys):
    bag = _import_benchmark("bench_attention_gpu")
    with pytest.raises(SystemExit) as e:  # a usage error, before any GPU work
        bag.main(["--jvp-backward-config", "64x64"])
    assert e.value.code == 2 and "--jvp-backward-config: expected a name such as" in capsys.readouterr().err
