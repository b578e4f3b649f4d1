"""torch.compile on CPU: fk.attention's primal path compiles with fullgraph=True to the custom ops, forward
mode inside a compiled region gives exact tangents, and a patched model compiles too.

Backend "aot_eager" (AOTAutograd graphs, no code generation) keeps compile times to seconds on 2 cores;
one test runs inductor end to end.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowmap_kernels as fk
from flowmap_kernels.integrations import patch_sdpa
from tests.integrations.helpers import GraphRecorder, TinySDPAModel
from tests.numerics import rel_err


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 6, 8, generator=g, dtype=dtype)
    k = torch.randn(1, 2, 9, 8, generator=g, dtype=dtype)
    v = torch.randn(1, 2, 9, 8, generator=g, dtype=dtype)
    return q, k, v


def _attn(q, k, v):
    return fk.attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.4)


def _errors_against_eager(cf, q, k, v):
    """Relative errors of the compiled ``cf`` against eager ``_attn``: (output, worst gradient of sum(O^2))."""
    out, want = cf(q, k, v), _attn(q, k, v)
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    gw = torch.autograd.grad(want.square().sum(), (q, k, v))
    return rel_err(out, want), max(rel_err(a, b) for a, b in zip(g, gw))


def test_primal_compiles_fullgraph_to_the_custom_ops_and_matches_eager():
    rec = GraphRecorder()
    cf = torch.compile(_attn, fullgraph=True, backend=rec.backend)
    q, k, v = (x.requires_grad_() for x in _inputs())
    err_out, err_grads = _errors_against_eager(cf, q, k, v)
    assert err_out < 1e-13 and err_grads < 1e-13
    fw, bw = rec.code  # one forward and one backward graph: no graph break
    assert "flowmap_kernels.attention_forward" in fw and "flowmap_kernels.attention_backward" in bw


def test_jvp_inside_compile_gives_exact_tangents_and_gradients():
    """torch.compile(torch.func.jvp(...)) and reverse-over-forward inside one compiled function. (The
    custom ops would carry a silent zero tangent through AOTAutograd; fk.attention traces the naive math
    when a forward-mode level is active.)"""
    q, k, v = _inputs()
    t = _inputs(seed=1)
    eager = torch.func.jvp(_attn, (q, k, v), t)

    def tangent_loss(q, k, v):
        return torch.func.jvp(_attn, (q, k, v), t)[1].square().sum()

    cj = torch.compile(lambda *a: torch.func.jvp(_attn, a[:3], a[3:]), fullgraph=True, backend="aot_eager")
    o, to = cj(q, k, v, *t)
    assert rel_err(o, eager[0]) < 1e-13 and rel_err(to, eager[1]) < 1e-13 and to.abs().max() > 0.1
    grad_fn = torch.func.grad(tangent_loss, argnums=(0, 1, 2))
    grads = torch.compile(grad_fn, fullgraph=True, backend="aot_eager")(q, k, v)
    want = torch.func.grad(tangent_loss, argnums=(0, 1, 2))(q, k, v)
    assert max(rel_err(a, b) for a, b in zip(grads, want)) < 1e-12


def test_dual_tensors_into_a_compiled_function():
    q, k, v = _inputs()
    t = _inputs(seed=1)
    _, want = torch.func.jvp(_attn, (q, k, v), t)
    cf = torch.compile(_attn, backend="aot_eager")
    with fwAD.dual_level():
        out = cf(*(fwAD.make_dual(x, tx) for x, tx in zip((q, k, v), t)))
        tangent = fwAD.unpack_dual(out).tangent
    assert tangent is not None and rel_err(tangent, want) < 1e-13


def test_func_jvp_of_a_compiled_function_works_or_refuses():
    """PyTorch 2.13's Dynamo refuses torch.func.jvp(compiled_fn) from eager mode with an error; if a later
    version accepts it, the tangent must be right."""
    q, k, v = _inputs()
    t = _inputs(seed=1)
    _, want = torch.func.jvp(_attn, (q, k, v), t)
    cf = torch.compile(_attn, backend="aot_eager")
    try:
        _, to = torch.func.jvp(cf, (q, k, v), t)
    except torch._dynamo.exc.Unsupported as e:
        assert "functorch" in str(e)
    else:  # pragma: no cover - newer PyTorch
        assert rel_err(to, want) < 1e-13


def test_patched_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = TinySDPAModel().double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    want = model(x)
    gw = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    rec = GraphRecorder()
    with patch_sdpa():
        cm = torch.compile(model, fullgraph=True, backend=rec.backend)
        out = cm(x)
        g = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert rel_err(out, want) < 1e-12
    assert max(rel_err(a, b) for a, b in zip(g, gw)) < 1e-10
    assert rec.code[0].count("flowmap_kernels.attention_forward") == 2


@pytest.mark.slow
def test_inductor_primal_forward_and_backward():
    q, k, v = (x.float().requires_grad_() for x in _inputs())
    err_out, err_grads = _errors_against_eager(torch.compile(_attn, fullgraph=True), q, k, v)
    assert err_out < 1e-6 and err_grads < 1e-5


def test_attention_jvp_compiles_with_transposed_inputs():
    """fk.attention_jvp (explicit tangents) in a compiled graph, inputs as transposed views the way models
    make them; checks the custom ops' fake strides against what the kernels return."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(6)]

    def f(*xs):
        q, k, v, tq, tk, tv = (x.view(2, 5, 2, 4).transpose(1, 2) for x in xs)
        o, to = fk.attention_jvp(q, k, v, tq, tk, tv, is_causal=True)
        return (o.transpose(1, 2).reshape(2, 5, 8) * to.transpose(1, 2).reshape(2, 5, 8)).sum()

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(*base), base)
    want = torch.autograd.grad(f(*base), base)
    assert max(rel_err(a, b) for a, b in zip(got, want)) < 1e-12


def test_fallback_inside_a_compiled_function():
    """A call the patch cannot serve (dropout) inside torch.compile (no fullgraph): Dynamo breaks the
    graph around the warning and the original runs, with the same dropout mask as eager."""
    from flowmap_kernels.integrations import SDPAFallbackWarning, fallback_counts, reset_fallbacks
    q, k, v = _inputs(dtype=torch.float32)
    q = q[:, :2]  # as many query heads as key heads
    reset_fallbacks()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)

    torch.manual_seed(0)
    want = f(q, k, v)
    with patch_sdpa(), pytest.warns(SDPAFallbackWarning, match="dropout"):
        torch.manual_seed(0)
        got = torch.compile(f, backend="aot_eager")(q, k, v)
    assert torch.equal(got, want)
    assert fallback_counts() == {"dropout_p": 1}


def test_fallback_inside_a_fullgraph_compiled_function():
    """The same under torch.compile(fullgraph=True) (timm's Attention passes its dropout_p in training): no
    graph break; the fallback is noted once, when Dynamo traces the call (a lock does not trace)."""
    from flowmap_kernels.integrations import SDPAFallbackWarning, fallback_counts, reset_fallbacks
    q, k, v = _inputs(dtype=torch.float32)
    q = q[:, :2]
    reset_fallbacks()

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.3) + F.scaled_dot_product_attention(q, k, v)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    with patch_sdpa(), pytest.warns(SDPAFallbackWarning, match="dropout"):
        got = compiled(q, k, v)
        again = compiled(q, k, v)
    assert fallback_counts() == {"dropout_p": 1}
    # undropped entries are the attention output over the kept probabilities (rescaled): finite, right shape
    assert got.shape == again.shape == (q.shape[0], 2, q.shape[2], v.shape[-1]) and torch.isfinite(got).all()
    torch._dynamo.reset()
