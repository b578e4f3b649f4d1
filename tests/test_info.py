"""``python -m flowmap_kernels.info`` prints :func:`flowmap_kernels.build_info` (readable, or ``--json``),
without runpy's warning about a module imported with the package."""
from __future__ import annotations

import json
import subprocess
import sys

import flowmap_kernels as fk
from flowmap_kernels.info import format_build_info


def _run(*args):
    return subprocess.run([sys.executable, "-m", "flowmap_kernels.info", *args], capture_output=True, text=True,
                          timeout=120)


def test_module_prints_the_build_report():
    res = _run()
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"flowmap_kernels {fk.__version__}\n")
    assert "usable backends:" in res.stdout and "attention_varlen" in res.stdout and "torch" in res.stdout
    assert "RuntimeWarning" not in res.stderr


def test_module_prints_json():
    res = _run("--json")
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    assert info["version"] == fk.__version__ and "attention" in info["backends"]


def test_format_lists_every_field():
    info = fk.build_info()
    text = format_build_info(info)
    for key in info:
        if key not in ("version", "backends"):
            assert key in text
    for op in info["backends"]:
        assert f"  {op} " in text
