"""The README's usage block runs as written (CPU, the blockwise backend)."""
from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_block_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    code = blocks[0]
    assert "fk.attention" in code and len([line for line in code.splitlines() if line.strip()]) <= 16
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    o, to = scope["o"], scope["to"]
    assert o.shape == to.shape == (1024, 8, 64) and torch.isfinite(o).all() and torch.isfinite(to).all()
    assert scope["q"].grad is not None and torch.isfinite(scope["q"].grad).all()
