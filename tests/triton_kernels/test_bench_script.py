"""The GPU benchmark script runs on a machine without a GPU: it says so and exits 0 (no numbers)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
