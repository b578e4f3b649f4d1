"""The sdist's file list (MANIFEST.in): everything a build from the unpacked sdist compiles against (csrc/
sources and headers), the license, and the tests with their helper packages, the benchmarks, the docs and
the scripts. Read from ``setup.py egg_info`` (its SOURCES.txt is the sdist's manifest), written outside the
repository; no compilation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_TREES = ("csrc", "tests", "benchmarks", "docs", "scripts")


def _setuptools_version() -> tuple:
    import setuptools
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    if not (ROOT / "setup.py").exists():
        pytest.skip("not a source tree (no setup.py)")
    if _setuptools_version() < (77, 0):
        pytest.skip("setuptools >= 77 is needed for the SPDX license string")
    base = tmp_path_factory.mktemp("egg")
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    (info,) = base.glob("*.egg-info")
    return info, res.stderr


def _on_disk(tree: str) -> set:
    out = set()
    for folder, dirs, files in os.walk(ROOT / tree):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for f in files:
            if not f.endswith((".pyc", ".pyo")):
                out.add((Path(folder) / f).relative_to(ROOT).as_posix())
    return out


def test_sdist_lists_headers_license_and_test_packages(egg_info):
    info, _ = egg_info
    listed = set((info / "SOURCES.txt").read_text().split())
    for header in ("csrc/include/flowmap/pointwise.h", "csrc/include/flowmap/common.h", "csrc/cuda/kernels.cuh"):
        assert header in listed
    for tree in SHIPPED_TREES:
        missing = _on_disk(tree) - listed
        assert not missing, f"{tree}/ files left out of the sdist: {sorted(missing)[:10]}"
    assert {"LICENSE", "MANIFEST.in", "pyproject.toml", "setup.py", "README.md"} <= listed
    assert {"tests/__init__.py", "tests/attention/cases.py", "tests/reference.py"} <= listed


def test_license_metadata_is_an_spdx_expression(egg_info):
    info, stderr = egg_info
    meta = (info / "PKG-INFO").read_text()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    assert "project.license` as a TOML table is deprecated" not in stderr
    assert "Apache License" in (ROOT / "LICENSE").read_text()
