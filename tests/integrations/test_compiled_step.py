"""A whole flow-map training step (loss with its JVP, backward, clipping, Adam) under torch.compile(fullgraph=True)
for meanflow, tvm and scm on the package's DiT: equal to eager, the fused custom ops in the graph (counted
from the graph code), no naive attention, no host synchronisation.

The methods take their JVP through flowmap_kernels.func.jvp, i.e. DiT.forward_jvp (explicit-tangent ops,
no forward-mode AD), which Dynamo traces into one graph. Backend: a recorder over aot_eager (AOTAutograd
graphs, no code generation) keeps compile times to seconds; one test runs inductor.
"""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.attention import functional as attn_functional
from flowmap_kernels.compiled_step import TrainStep
from flowmap_kernels.methods import meanflow, scm, tvm
from flowmap_kernels.nn import DiT
from tests.integrations.helpers import GraphRecorder
from tests.numerics import rel_err
from tests.reference import random_parameters_

METHODS = {"meanflow": meanflow, "tvm": tvm, "scm": scm}
DEPTH = 1
# Host synchronisation / scalar reads / data-dependent checks that must not appear in a CUDA-graph-safe step.
SYNC_PATTERNS = ("_local_scalar_dense", ".item(", "aten.is_nonzero", "aten.equal", "_assert_async",
                 "aten.nonzero", "aten.allclose")
# naive attention: its explicit softmax subtracts the row max (aten.amax); no other op of the step does
NAIVE_ATTENTION = ("aten.amax", "softmax", "scaled_dot_product", "aten.bmm", "aten.baddbmm")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with fk.use_backend("torch"):
        yield
    torch._dynamo.reset()


def _dit(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = DiT(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, freq_dim=16, qk_norm=True)
    return random_parameters_(m, seed, 0.1).to(dtype)


def _model_for(name, dtype=torch.float64):
    m = _dit(dtype)
    return scm.prepare_model(m) if name == "scm" else m


def _ops(code: str) -> dict:
    names = set(re.findall(r"flowmap_kernels\.(\w+)\.default", code))
    return {k: code.count(f"flowmap_kernels.{k}.default") for k in names}


def _run_steps(model, method, mode, backend, n=2, dtype=torch.float64, lr=3e-3):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    step = TrainStep(model, method, opt, compile=mode, backend=backend, grad_clip=1.0)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    y = torch.tensor([1, 7])
    losses = []
    for i in range(n):
        torch.manual_seed(100 + i)  # the same times and noise in every mode
        lo, logs = step(x0, y, lr=lr * (i + 1))
        losses.append(lo)
        assert set(logs) >= {"loss"}
    return losses, [p.detach().clone() for p in model.parameters()], step


@pytest.mark.parametrize("name", sorted(METHODS))
def test_compiled_step_equals_eager_with_fused_ops_in_one_graph(name):
    method = METHODS[name]
    base = _model_for(name)
    eager_losses, eager_params, _ = _run_steps(copy.deepcopy(base), method, "none", None)
    rec = GraphRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attn_functional.CompiledForwardModeWarning)  # no naive fallback
        losses, params, step = _run_steps(copy.deepcopy(base), method, "default", rec.backend)
    for a, b in zip(losses, eager_losses):
        assert rel_err(a, b) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(params, eager_params)) < 1e-10
    assert max(rel_err(a, b) for a, b in zip(params, base.parameters())) > 1e-4  # the step did update
    assert step.compile_seconds is not None and step.compile_seconds > 0
    # One graph for the whole step (fullgraph=True, loss + backward + update traced together), compiled once.
    assert len(rec.code) == 1, len(rec.code)
    code = rec.code[0]
    ops = _ops(code)
    assert ops.get("attention_jvp_forward") == DEPTH, ops
    # per block: 2 modulated LayerNorms + 2 QK RMSNorms, 1 GELU, 2 gated residuals; final layer: 1 norm
    assert ops.get("norm_jvp_forward") == 4 * DEPTH + 1, ops
    assert ops.get("gelu_jvp_forward") == DEPTH and ops.get("gated_jvp_forward") == 2 * DEPTH, ops
    assert ops.get("linear_jvp_forward", 0) >= 4 * DEPTH + 6, ops
    if name == "tvm":  # backward through the JVP, + the stopped teacher's forward and the flow-matching pass
        assert ops.get("attention_jvp_backward") == DEPTH, ops
        assert ops.get("attention_forward") == 2 * DEPTH and ops.get("attention_backward") == DEPTH, ops
        assert ops.get("norm_jvp_backward") == 4 * DEPTH + 1 and ops.get("linear_jvp_backward", 0) >= 4 * DEPTH, ops
    else:  # the loss stops the JVP's gradient (tangent_grad=False): every fused op's backward is the primal one
        assert "attention_forward" not in ops and ops.get("attention_backward") == DEPTH, ops
        assert ops.get("norm_backward") == 4 * DEPTH + 1, ops
        assert not [k for k in ops if k.endswith("jvp_backward")], ops
    for pattern in NAIVE_ATTENTION + SYNC_PATTERNS:
        assert pattern not in code, pattern


def test_compiled_step_equals_torch_optim_adam():
    """The step's Adam (capturable algorithm, clipping; eager here, the compiled step equals it above) against
    torch.optim.Adam + clip_grad_norm_."""
    base = _model_for("meanflow")
    losses, params, _ = _run_steps(copy.deepcopy(base), meanflow, "none", None, n=3)
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for i in range(3):
        torch.manual_seed(100 + i)
        for g in opt.param_groups:
            g["lr"] = 3e-3 * (i + 1)
        lo, _ = meanflow.loss(model, x0, cond=torch.tensor([1, 7]))
        opt.zero_grad()
        lo.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        assert rel_err(losses[i], lo) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(params, model.parameters())) < 1e-10
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())


def test_adamw_weight_decay_matches_torch():
    base = _dit()
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    step = TrainStep(model, tvm, opt, compile="none")
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for i in range(2):
        torch.manual_seed(i)
        step(x0, torch.tensor([1, 2]))
        torch.manual_seed(i)
        lo, _ = tvm.loss(ref, x0, cond=torch.tensor([1, 2]))
        ropt.zero_grad()
        lo.backward()
        ropt.step()
    assert max(rel_err(a, b) for a, b in zip(model.parameters(), ref.parameters())) < 1e-10


def test_step_argument_errors():
    m = _dit()
    opt = torch.optim.Adam(m.parameters())
    with pytest.raises(ValueError, match="compile: expected"):
        TrainStep(m, meanflow, opt, compile="max")
    with pytest.raises(ValueError, match="optimizer: the compiled step implements Adam"):
        TrainStep(m, meanflow, torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        TrainStep(m, meanflow, torch.optim.Adam(m.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="generator"):
        TrainStep(m, meanflow, opt, method_cfg={"generator": torch.Generator()})
    with pytest.raises(ValueError, match="method"):
        TrainStep(m, object(), opt)
    fk.apply_activation_checkpointing(m, "blocks")  # forward-mode checkpointing runs eagerly: no fullgraph step
    with pytest.raises(ValueError, match="model: activation checkpointing"):
        TrainStep(m, meanflow, opt)
    TrainStep(m, meanflow, opt, compile="none")


def test_torch_func_jvp_inside_compile_warns_once_about_naive_attention():
    """Without the dual form (torch.func.jvp traced by Dynamo) attention falls back to the naive math:
    exact, but O(N^2) memory; one warning per process says so."""
    m = _dit()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    s, t = torch.full((2,), 0.6, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64)
    tangents = (torch.ones_like(x), torch.ones_like(s), torch.zeros_like(t))

    def f(x, s, t):
        return torch.func.jvp(lambda *a: m(*a, y=None), (x, s, t), tangents)

    attn_functional._WARNED_COMPILED_FORWARD_MODE[0] = False
    with pytest.warns(attn_functional.CompiledForwardModeWarning, match=r"O\(N\^2\) memory"):
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, s, t)
    want = f(x, s, t)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-12
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", attn_functional.CompiledForwardModeWarning)
        torch.compile(f, fullgraph=True, backend="aot_eager")(x, s, t)  # once per process


@pytest.mark.slow
def test_inductor_meanflow_step_float32():
    """One inductor compilation (fallback_random: the same random draws as eager)."""
    base = _model_for("meanflow", torch.float32)
    eager_losses, eager_params, _ = _run_steps(copy.deepcopy(base), meanflow, "none", None, dtype=torch.float32)
    with torch._inductor.config.patch(fallback_random=True):
        losses, params, step = _run_steps(copy.deepcopy(base), meanflow, "default", "inductor", dtype=torch.float32)
    for a, b in zip(losses, eager_losses):
        assert rel_err(a, b) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(params, eager_params)) < 1e-4


def test_third_party_model_compiles_with_naive_attention_and_says_so():
    """A model without a dual form (third-party code through patch_sdpa): fk.func.jvp runs torch.func.jvp, which
    compiles fullgraph with exact results, but attention is the naive math in the graph (no fused
    JVP op) and a CompiledForwardModeWarning says so. Its primal forward keeps the fused op. (The model's
    nn.LayerNorms are replaced: PyTorch 2.13's Dynamo cannot trace torch.func.jvp through nn.LayerNorm at all,
    "RuntimeError when making fake tensor call" from aten._fw_primal, with or without fullgraph.)"""
    from flowmap_kernels import func
    from flowmap_kernels.integrations import patch_sdpa
    from tests.integrations.helpers import TinySDPAModel
    torch.manual_seed(0)
    model = TinySDPAModel().double()
    model.norm1, model.norm2 = torch.nn.Identity(), torch.nn.Identity()
    params = list(model.parameters())
    x, tx = torch.randn(2, 5, 24, dtype=torch.float64), torch.randn(2, 5, 24, dtype=torch.float64)
    assert not func.has_dual_form(model)

    def step(x, tx):
        primal = model(x).sum()  # a primal call first: the jvp's attention must still see its forward level
        y, ty = func.jvp(model, (x,), (tx,))
        lo = ty.square().sum() + primal
        return lo.detach(), torch.autograd.grad(lo, params)

    rec = GraphRecorder()
    attn_functional._WARNED_COMPILED_FORWARD_MODE[0] = False
    with patch_sdpa(), torch._dynamo.config.patch(trace_autograd_ops=True):
        want = step(x, tx)
        with pytest.warns(attn_functional.CompiledForwardModeWarning):
            got = torch.compile(step, fullgraph=True, backend=rec.backend)(x, tx)
    assert rel_err(got[0], want[0]) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(got[1], want[1])) < 1e-10
    code = "\n".join(rec.code)
    assert "aten.amax" in code and "attention_jvp_forward" not in code  # the naive math, not the fused op
    assert _ops(code).get("attention_forward") == 2  # the primal model(x) call: fused


def test_primal_call_before_a_traced_jvp_keeps_exact_tangents():
    """Regression: a primal fk.attention call and then torch.func.jvp in ONE compiled function. Dynamo caches
    the first read of forward_ad._current_level, so a check reading it saw no forward level inside the jvp
    and ran the custom op, whose tangent AOTAutograd takes as zero (silently wrong); the check now runs at
    trace time on the functorch interpreter stack."""
    g = torch.Generator().manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(6))

    def attn(q, k, v):
        return fk.attention(q, k, v, is_causal=True)

    def f(q, k, v, tq, tk, tv):
        o = attn(q, k, v)
        _, to = torch.func.jvp(attn, (q, k, v), (tq, tk, tv))
        return o, to

    want = f(q, k, v, tq, tk, tv)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, tq, tk, tv)
    assert want[1].abs().max() > 0.1
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-12


def test_mlp_flow_map_step_compiles_with_ema_teacher_and_step_kwarg():
    """The 2D model of the training loop: TVM with an EMA teacher module and sCM with its warm-up ``step``
    passed per call (a changing Python int: at most one recompilation, then dynamic)."""
    from flowmap_kernels.models import MLPFlowMap
    torch.manual_seed(0)
    base = MLPFlowMap(shape=(2,), hidden=16, depth=2, emb_dim=8).double()
    torch.nn.init.normal_(base.out.weight, std=0.1)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for method, cfg, kw in ((tvm, {"teacher": copy.deepcopy(base).requires_grad_(False)}, {}),
                            (scm, {"adaptive_weighting": False, "warmup_steps": 10}, {"step": None})):
        results = {}
        for mode in ("none", "default"):
            torch._dynamo.reset()
            model = copy.deepcopy(base)
            step = TrainStep(model, method, torch.optim.Adam(model.parameters(), lr=1e-2), compile=mode,
                             backend="aot_eager", method_cfg=cfg)
            losses = []
            for i in range(3):
                torch.manual_seed(i)
                extra = {"step": i} if "step" in kw else {}
                losses.append(step(x0, None, **extra)[0])
            results[mode] = (losses, [p.detach().clone() for p in model.parameters()])
        for a, b in zip(results["default"][0], results["none"][0]):
            assert rel_err(a, b) < 1e-12
        assert max(rel_err(a, b) for a, b in zip(results["default"][1], results["none"][1])) < 1e-10


@pytest.mark.parametrize("name", ["tvm", "meanflow"])
def test_changing_batch_size_equals_eager(name):
    """Batches of 2, 3, 5, 2: the second shape recompiles with a dynamic batch size, which the methods' noise
    and time draws must trace (torch.rand / randn given generator=None and a symbolic size failed under Dynamo:
    "SymIntArrayRef expected to contain only concrete integers"); losses and parameters equal eager."""
    from flowmap_kernels.models import MLPFlowMap
    torch.manual_seed(0)
    base = MLPFlowMap(shape=(2,), hidden=16, depth=1, emb_dim=8).double()
    torch.nn.init.normal_(base.out.weight, std=0.1)
    results = {}
    for mode in ("none", "default"):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        step = TrainStep(model, METHODS[name], torch.optim.Adam(model.parameters(), lr=1e-2), compile=mode,
                         backend="aot_eager")
        losses = []
        for i, b in enumerate((2, 3, 5, 2)):
            torch.manual_seed(i)
            x0 = torch.randn(b, 2, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64)
            losses.append(step(x0, None)[0])
        results[mode] = (losses, [p.detach().clone() for p in model.parameters()])
    for a, b in zip(results["default"][0], results["none"][0]):
        assert rel_err(a, b) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(results["default"][1], results["none"][1])) < 1e-10


_FRESH_PROCESS_COMPILE = """
import torch, flowmap_kernels as fk
from flowmap_kernels import ops
g = torch.Generator().manual_seed(0)
x, tx = (torch.randn(2, 5, 8, generator=g) for _ in range(2))
shift, scale, b = (torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g), torch.randn(8, generator=g))

def f(x, tx):  # per-channel operands (the row-chunked gradient reductions) and the modules' first probe
    y, ty = ops.modulated_layer_norm_jvp(x, shift, scale, tx)
    return ops.gelu_tanh_jvp(y, b, ty)

got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, tx)  # the first call of any fused op
want = f(x, tx)
assert all(torch.equal(a, w) for a, w in zip(got, want)), [(a - w).abs().max() for a, w in zip(got, want)]
print(ops.resolve_backend("gelu_tanh", x))
"""


def test_extension_ops_compile_fullgraph_as_a_process_first_call():
    """The compiled extension's ops inside a fullgraph trace, before anything ran eagerly (the module import and
    the CPU thread count are read outside the traced code)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_COMPILE], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    if fk.build_info().get("cpu_extension"):
        assert r.stdout.strip().endswith("extension"), r.stdout


def test_float32_step_compiles_with_the_extension_ops():
    """float32 runs the DiT primitives on the compiled extension ("auto"): the whole step still traces into one
    graph and equals eager."""
    if not fk.build_info().get("cpu_extension"):
        pytest.skip("the CPU extension is not built")
    base = _model_for("meanflow", torch.float32)
    with fk.use_backend("auto"):
        eager_losses, eager_params, _ = _run_steps(copy.deepcopy(base), meanflow, "none", None, dtype=torch.float32)
        rec = GraphRecorder()
        losses, params, _ = _run_steps(copy.deepcopy(base), meanflow, "default", rec.backend, dtype=torch.float32)
    for a, b in zip(losses, eager_losses):
        assert rel_err(a, b) < 1e-6
    assert max(rel_err(a, b) for a, b in zip(params, eager_params)) < 1e-5
    assert len(rec.code) == 1 and _ops(rec.code[0]).get("norm_jvp_forward") == 4 * DEPTH + 1


def test_compiled_meanflow_steps_when_tangent_grad_false_is_the_first_use_in_the_process():
    """MeanFlow's loss runs fk.func.jvp(..., tangent_grad=False): its per-thread switch, set inside the compiled
    step, must not invalidate the guards of the frame that set it (Dynamo failed on the next call). A fresh
    process, so that the compiled step is the switch's first use."""
    import subprocess
    import sys
    code = ("import torch\n"
            "from flowmap_kernels.compiled_step import TrainStep\n"
            "from flowmap_kernels.methods import meanflow\n"
            "from flowmap_kernels.nn import DiT\n"
            "torch.manual_seed(0)\n"
            "m = DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8)\n"
            "step = TrainStep(m, meanflow, torch.optim.AdamW(m.parameters(), lr=1e-3), compile='default',"
            " backend='eager')\n"
            "for b in (2, 2, 3):\n"
            "    loss, _ = step(torch.randn(b, 1, 4, 4), cond=torch.randint(0, 10, (b,)))\n"
            "    assert torch.isfinite(loss)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
