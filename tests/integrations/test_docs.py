"""Python blocks of the docs run as written: docs/integrations.md's and the README's diffusers examples (small
DiT, random weights), docs/methods.md's one-interface call, docs/scaling.md's context-parallel example (two gloo
ranks) and its saved-activation count."""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def block_with(path: pathlib.Path, marker: str) -> str:
    found = [b for b in python_blocks(path) if marker in b]
    assert len(found) == 1, f"expected one python block with {marker!r} in {path.name}, found {len(found)}"
    return found[0]


def _run_diffusers_block(path: pathlib.Path, code: str):
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, str(path), "exec"), scope)
    assert torch.isfinite(scope["loss"])
    model = scope["model"]
    assert model.interval_embedder.linear_2.weight.abs().sum() > 0  # the optimizer stepped it


def test_diffusers_example_runs():
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install diffusers)")
    blocks = python_blocks(DOC)
    assert blocks, "no python example in docs/integrations.md"
    _run_diffusers_block(DOC, blocks[0])


def test_readme_diffusers_example_runs():
    """The README's copy of the example (it says that this file runs it)."""
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install diffusers)")
    readme = ROOT / "README.md"
    _run_diffusers_block(readme, block_with(readme, "DiffusersFlowMap"))


def test_methods_one_interface_block_runs():
    from flowmap_kernels.models import MLPFlowMap
    doc = ROOT / "docs" / "methods.md"
    code = block_with(doc, "METHODS[")
    torch.manual_seed(0)
    scope = {"model": MLPFlowMap(hidden=32, depth=1), "x0": torch.randn(8, 2), "cfg": {"cfg_dropout": 0.0}}
    exec(compile(code, str(doc), "exec"), scope)
    loss, logs = scope["loss"], scope["logs"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad and isinstance(logs, dict)


def _scaling_cp_job(rank, world, code):
    import torch.distributed as dist

    import flowmap_kernels as fk
    import flowmap_kernels.distributed as fkd
    from flowmap_kernels.nn import DiT
    torch.manual_seed(0)  # the same full tensors and model on every rank
    group = dist.group.WORLD
    q, k, v = (torch.randn(1, 2, 13, 8, dtype=torch.float64) for _ in range(3))
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    tql, tkl, tvl = (fkd.shard_sequence(x, group, dim=2, load_balance=True) for x in (tq, tk, tv))
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    s = torch.rand(2, dtype=torch.float64)
    t = s / 2
    y = torch.tensor([1, 2])
    dx, ds, dt = torch.randn_like(x), torch.zeros_like(s), torch.ones_like(t)
    scope = dict(q=q, k=k, v=v, tql=tql, tkl=tkl, tvl=tvl, group=group, model=model, x=x, s=s, t=t, y=y,
                 dx=dx, ds=ds, dt=dt)
    exec(compile(code, "docs/scaling.md", "exec"), scope)
    o_ref, _ = fk.attention_jvp(q, k, v, tq, tk, tv)
    v_ref, tv_ref = torch.func.jvp(lambda x, s, t: model(x, s, t, y), (x, s, t), (dx, ds, dt))
    errs = [(scope["o_full"] - o_ref).abs().max(), (scope["v"] - v_ref).abs().max(), (scope["tv"] - tv_ref).abs().max()]
    return [float(e) for e in errs]


def test_scaling_context_parallel_block_runs(tmp_path):
    from tests.distributed.harness import spawn
    doc = ROOT / "docs" / "scaling.md"
    code = block_with(doc, "context_parallel_attention(")
    errs = spawn(_scaling_cp_job, 2, tmp_path, code, timeout=120)
    assert max(errs) < 1e-12, errs


def test_scaling_saved_bytes_block(capsys):
    """docs/scaling.md's count of the d-vectors a DiT block saves per token (prints 48.4)."""
    doc = ROOT / "docs" / "scaling.md"
    code = block_with(doc, "def saved_bytes")
    claim = re.search(r"float32\): ([0-9.]+)", code)
    assert claim, "the block states its printed figure in its last comment"
    exec(compile(code, str(doc), "exec"), {"__name__": "docs_scaling"})
    printed = float(capsys.readouterr().out.split()[-1])
    assert f"{printed:.1f}" == claim.group(1), (printed, claim.group(1))
