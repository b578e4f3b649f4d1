"""``python -m flowmap_kernels.compile_report``: usage errors before anything compiles, the count line says
what it counts, and a note when the CUDA C++ sources are not there (record sources replaced by stand-ins)."""
from __future__ import annotations

import pytest

from flowmap_kernels import compile_report as cr
from flowmap_kernels.compile_report import cuda

TRITON_RECORD = dict(kernel="forward", config="x", arch="sm_80", dtype="bf16", head_dim=64, registers=32,
                     spill_bytes=0, shared_bytes=0, uses_wgmma=False, source="triton")
CUDA_RECORD = dict(kernel="gelu_fwd_kernel", config="float32", arch="sm_80", registers=16, spill_bytes=0,
                   shared_bytes=0, uses_wgmma=False, source="cuda")


def _no_compiling(archs, **_):
    raise AssertionError("compiled before the arguments were checked")


@pytest.mark.parametrize("argv, message", [
    (["--head-dims", "0"], "--head-dims: expected head dims in 1..256, got 0"),
    (["--head-dims", "64", "-8", "512"], "--head-dims: expected head dims in 1..256, got -8 512"),
    (["--workers", "-1"], "--workers: expected a count >= 0 (0: one per CPU), got -1"),
    (["--json", "/nonexistent-folder/x.json"], "--json: folder '/nonexistent-folder'"),
])
def test_bad_arguments_are_usage_errors_before_compiling(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(cr, "RECORD_SOURCES", [_no_compiling])
    with pytest.raises(SystemExit) as e:
        cr.main(["--arch", "sm_80"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_markdown_path_must_be_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cr, "RECORD_SOURCES", [_no_compiling])
    with pytest.raises(SystemExit):
        cr.main(["--arch", "sm_80", "--markdown", str(tmp_path)])
    assert "--markdown: expected a file path" in capsys.readouterr().err


def test_count_line_names_triton_launches_and_cuda_kernels(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cr, "RECORD_SOURCES", [lambda archs, **_: [dict(TRITON_RECORD)],
                                               lambda archs, **_: [dict(CUDA_RECORD), dict(CUDA_RECORD)]])
    monkeypatch.setattr(cuda, "unavailable", lambda: None)
    assert cr.main(["--arch", "sm_80", "--json", str(tmp_path / "r.json")]) == 0
    assert "\n1 Triton launch + 2 CUDA kernels; 0 spill; 0 over the shared-memory limit" in capsys.readouterr().out
    assert cr.count_line([dict(TRITON_RECORD)] * 3, with_cuda=False) == "3 Triton launches"


def test_missing_cuda_sources_give_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cuda, "SOURCE", str(tmp_path / "csrc" / "cuda" / "kernels.cu"))
    fake_triton = lambda archs, **_: [dict(TRITON_RECORD)]  # noqa: E731
    monkeypatch.setattr(cr, "triton_records_source", fake_triton)  # (--triton-only)
    monkeypatch.setattr(cr, "RECORD_SOURCES", [fake_triton, cr.cuda_records_source])
    assert cr.main(["--arch", "sm_80"]) == 0
    out, err = capsys.readouterr()
    assert "note: no CUDA kernel records: the CUDA C++ sources are not next to the package" in err
    assert "source checkout" in err
    assert "1 Triton launch + 0 CUDA kernels;" in out
    assert cr.main(["--arch", "sm_80", "--triton-only"]) == 0  # no CUDA source asked for: no note
    out, err = capsys.readouterr()
    assert "note:" not in err and "\n1 Triton launch; 0 spill" in out
