"""nvcc -Xptxas -v records of the CUDA kernels (no GPU needed)."""
import shutil

import pytest

from flowmap_kernels.compile_report import cuda as compile_report

KERNELS = {"norm_fwd_kernel", "norm_bwd_kernel", "norm_jvp_fwd_kernel", "norm_jvp_bwd_kernel", "gelu_fwd_kernel",
           "gelu_bwd_kernel", "gelu_jvp_fwd_kernel", "gelu_jvp_bwd_kernel", "gated_fwd_kernel", "gated_bwd_kernel",
           "gated_jvp_fwd_kernel", "gated_jvp_bwd_kernel"}

SAMPLE = """ptxas info    : Compiling entry function '_ZN12flowmap_cuda12_GLOBAL__N_115gelu_fwd_kernelIfEEvPKT_xS4_PS2_xx' for 'sm_80'
ptxas info    : Function properties for _ZN12flowmap_cuda12_GLOBAL__N_115gelu_fwd_kernelIfEEvPKT_xS4_PS2_xx
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 128 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas_sample():
    (r,) = compile_report.parse_ptxas(SAMPLE, "sm_80")
    assert r == {"kernel": "gelu_fwd_kernel", "config": "float32", "arch": "sm_80", "registers": 40,
                 "spill_bytes": 12, "shared_bytes": 128, "uses_wgmma": False}


def test_cuda_records_cover_every_kernel_without_spills():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    recs = compile_report.cuda_records()
    assert {r["arch"] for r in recs} == {"sm_" + a for a in compile_report.CUDA_ARCHS}
    for arch in {r["arch"] for r in recs}:
        mine = [r for r in recs if r["arch"] == arch]
        assert {r["kernel"] for r in mine} == KERNELS
        assert {r["config"] for r in mine} == {"float32", "float16", "bfloat16"}
    # row-wise kernels: no spills, registers well under the 64 that keep two blocks of 1024 threads resident;
    # static shared memory far below the smallest per-block limit (99 KB on sm_86 / sm_89 / sm_120)
    assert all(r["spill_bytes"] == 0 and 0 < r["registers"] <= 64 and r["shared_bytes"] < 48 * 1024 for r in recs)


def test_missing_sources_are_explained(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_report, "SOURCE", str(tmp_path / "kernels.cu"))
    assert compile_report.cuda_records() == []
    assert "run from a source checkout" in compile_report.unavailable()
    monkeypatch.setattr(compile_report.shutil, "which", lambda name: None)
    monkeypatch.setattr(compile_report, "SOURCE", __file__)  # present; nvcc is not
    assert compile_report.unavailable() == "nvcc is not on PATH" and compile_report.cuda_records() == []
