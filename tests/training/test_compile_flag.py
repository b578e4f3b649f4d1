"""The training loop's --compile flag: the whole step (flowmap_kernels.compiled_step) compiled, the same
losses and weights as the eager loop, compile time reported apart; the flag's errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.training import loop
from tests.numerics import rel_err

TINY = ["--width", "16", "--depth", "1", "--batch", "32", "--no-progress", "--threads", "1", "--no-eval"]


def _cfg(out, *extra):
    return train.resolve_config(train.build_parser().parse_args(["--out", str(out), *TINY, *extra]))


@pytest.mark.parametrize("method", ["tvm", "scm"])
def test_compiled_loop_equals_eager_loop(tmp_path, method):
    """TVM (EMA teacher inside the compiled step), sCM (learned loss weight, ``step`` passed per call);
    backend aot_eager (set through cfg.extra, as tests do) keeps the compile short."""
    flags = ["--method", method, "--steps", "4", "--ckpt-every", "100"]
    eager = loop.run(_cfg(tmp_path / "eager", *flags))
    torch._dynamo.reset()
    cfg = dataclasses.replace(_cfg(tmp_path / "compiled", *flags, "--compile", "default"),
                              extra={"compile_backend": "aot_eager"})
    compiled = loop.run(cfg)
    torch._dynamo.reset()
    assert eager["compile"] == "none" and compiled["compile"] == "default"
    assert compiled["compile_s"] > 0 and compiled["sec_per_step_after_compile"] >= 0
    ck_e = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    ck_c = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert ck_c["step"] == 4 and len(ck_c["losses"]) == 4
    for a, b in zip(ck_c["losses"], ck_e["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    for k, v in ck_e["model"].items():
        assert rel_err(ck_c["model"][k], v) < 1e-3, k
    assert ck_c["args"]["compile"] == "default"


def test_compile_flag_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--compile"):
        _cfg(tmp_path, "--compile", "default", "--dp-shard", "1")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--compile", "max-autotune"])
    assert _cfg(tmp_path).compile == "none"


def _tiny_mlp(**kw):
    from flowmap_kernels.models import MLPFlowMap
    torch.manual_seed(0)
    return MLPFlowMap((2,), hidden=16, depth=1, **kw)


@pytest.mark.slow
def test_inductor_compiles_the_backward_through_an_mlp_jvp():
    """The graph --compile builds for TVM / LSD on the MLP (no dual form: torch.func.jvp inside the compiled
    region, backward through its tangent), reduced to the JVP and the gradients: forward-mode AD gives the
    parameters' absent tangents as efficient zero tensors, whose buffer inductor (torch 2.13) reused as the
    out= of a matmul ("ZeroTensors are immutable"). With compiled_step.inductor_options it compiles and
    matches eager. (The smallest shapes that hit the reuse; about 35 s of inductor compilation on 2 cores.)"""
    import torch._inductor.config as inductor_config
    from flowmap_kernels.compiled_step import inductor_options
    from flowmap_kernels.methods._common import jvp
    model = _tiny_mlp()
    with torch.no_grad():  # a non-zero output layer: every gradient non-zero
        model.out.weight.normal_(0, 0.1)
    params = list(model.parameters())

    def step(x, s, t):
        v, dv = jvp(model, None, (x, s, t), (torch.zeros_like(x), torch.zeros_like(s), torch.ones_like(t)))
        return torch.autograd.grad((v + dv).square().mean(), params)

    g = torch.Generator().manual_seed(0)
    x, s, t = torch.randn(16, 2, generator=g), torch.rand(16, generator=g), torch.rand(16, generator=g)
    eager = step(x, s, t)
    options = inductor_options(model)
    assert options == {"allow_buffer_reuse": False}
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True), inductor_config.patch(options):
            compiled = torch.compile(step, fullgraph=True)(x, s, t)
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        assert rel_err(a, b) < 1e-5


def test_loop_compiles_the_mlp_step_without_inductor_buffer_reuse(tmp_path):
    """The compiled step patches inductor's config around every call for a model without a dual form (the
    MLP; see compiled_step.inductor_options), so the compilation sees it; the DiT (dual form, no forward-mode AD)
    keeps inductor's defaults. A recording backend (then aot_eager) reads the setting at compile time."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.backends.registry import lookup_backend
    seen = []

    def recording(gm, example_inputs):
        seen.append(inductor_config.allow_buffer_reuse)
        return lookup_backend("aot_eager")(gm, example_inputs)

    cfg = dataclasses.replace(_cfg(tmp_path, "--method", "lsd", "--steps", "2", "--compile", "default"),
                              extra={"compile_backend": recording})
    torch._dynamo.reset()
    try:
        loop.run(cfg)
    finally:
        torch._dynamo.reset()
    assert seen and not any(seen) and inductor_config.allow_buffer_reuse  # patched only around the calls
    from flowmap_kernels.compiled_step import inductor_options
    from flowmap_kernels.nn import dit_tiny
    assert inductor_options(dit_tiny()) == {}
