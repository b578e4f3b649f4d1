"""benchmarks/: the pytest-benchmark suite collects and runs with the README's command
(``pytest benchmarks/ --benchmark-only``; benchmarks/ is a package, so its helpers come from .conftest)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_readme_command_collects():
    res = _pytest("--benchmark-only", "--collect-only")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "test_attention_forward[torch]" in res.stdout and "error" not in res.stdout.lower()


def test_one_benchmark_runs():
    res = _pytest("--benchmark-only", "-k", "test_attention_forward and torch and not jvp", "--benchmark-max-time=0.01",
                  "--benchmark-min-rounds=1", "--benchmark-warmup=off")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "1 passed" in res.stdout
