"""docs/integrations.md: the diffusers example runs as written (small DiT, random weights)."""
from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install diffusers)")

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def test_diffusers_example_runs():
    import torch
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "no python example in docs/integrations.md"
    code = blocks[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    assert torch.isfinite(scope["loss"])
    model = scope["model"]
    assert model.interval_embedder.linear_2.weight.abs().sum() > 0  # the optimizer stepped it
