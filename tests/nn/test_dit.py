"""DiTBlock and DiT on the fused ops against the same modules under use_backend("naive") (plain PyTorch),
float32: outputs, tangents (torch.func.jvp) and parameter gradients of a loss on the tangent."""
import re

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.models import MLPFlowMap
from flowmap_kernels.nn import Attention, DiT, DiTBlock, LabelEmbedder, Linear, RMSNorm, TimestepEmbedder, dit_tiny
from flowmap_kernels.ops import kernels
from tests.numerics import rel_err
from tests.reference import random_parameters_

# tests.numerics.rel_err of the fused path against the naive one, both float32: a few float32 roundings
# through the block (measured worst 1.4e-6, a parameter gradient).
TOL = 5e-6


def _randomise(module, seed):
    random_parameters_(module, seed, 0.15)


def _run(module, fn, primals, tangents, backend):
    module.zero_grad(set_to_none=True)
    with fk.use_backend(backend):
        y, ty = torch.func.jvp(fn, primals, tangents)
        (ty ** 2).mean().backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
    return y.detach(), ty.detach(), grads


def _compare(module, fn, primals, tangents, fused="auto"):
    y, ty, g = _run(module, fn, primals, tangents, fused)
    y0, ty0, g0 = _run(module, fn, primals, tangents, "naive")
    assert rel_err(y, y0) < TOL
    assert rel_err(ty, ty0) < TOL
    names = [n for n, _ in module.named_parameters()]
    bad = {n: rel_err(a, b) for n, a, b in zip(names, g, g0) if b.abs().max() > 0 and rel_err(a, b) >= TOL}
    bad.update({n: float(a.abs().max()) for n, a, b in zip(names, g, g0)
                if b.abs().max() == 0 and a.abs().max() > 1e-7})
    assert not bad, bad
    return y, ty


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fused", ["auto", "torch"])
def test_dit_block_fused_matches_naive(qk_norm, fused):
    torch.manual_seed(0)
    block = DiTBlock(48, num_heads=4, mlp_ratio=2.0, qk_norm=qk_norm)
    _randomise(block, 1)
    x, c = torch.randn(3, 10, 48), torch.randn(3, 48)
    tx, tc = torch.randn_like(x), torch.randn_like(c)
    _compare(block, block, (x, c), (tx, tc), fused)


def test_dit_block_runs_the_fused_kernels(monkeypatch):
    """Under "auto" the block's norms / activation / residuals go through the fused JVP kernels."""
    counts = {}
    for name in ("norm_jvp_forward", "norm_jvp_backward", "gelu_jvp_forward", "gelu_jvp_backward",
                 "gated_jvp_forward", "gated_jvp_backward", "linear_jvp_forward", "linear_jvp_backward"):
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a)
        monkeypatch.setattr(kernels, name, spy)
    block = DiTBlock(32, num_heads=2, qk_norm=True)
    _randomise(block, 2)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    with fk.use_backend("auto"):
        _, ty = torch.func.jvp(block, (x, c), (torch.randn_like(x), torch.randn_like(c)))
        ty.square().sum().backward()
    assert counts == {"norm_jvp_forward": 4, "norm_jvp_backward": 4, "gelu_jvp_forward": 1, "gelu_jvp_backward": 1,
                      "gated_jvp_forward": 2, "gated_jvp_backward": 2, "linear_jvp_forward": 5,
                      "linear_jvp_backward": 5}, counts
    counts.clear()
    with fk.use_backend("naive"):
        _, ty = torch.func.jvp(block, (x, c), (torch.randn_like(x), torch.randn_like(c)))
        ty.square().sum().backward()
    assert counts == {}


@pytest.mark.parametrize("qk_norm", [False, True])
def test_dit_fused_matches_naive_along_x_and_t(qk_norm):
    torch.manual_seed(0)
    model = dit_tiny(hidden_size=32, depth=2, num_heads=2, qk_norm=qk_norm, num_classes=10)
    _randomise(model, 3)
    B = 3
    x = torch.randn(B, 1, 8, 8)
    s, t = torch.rand(B) * 0.5, 0.5 + torch.rand(B) * 0.5
    y = torch.tensor([1, 10, 4])  # 10 = the null class
    fn = lambda x_, t_: model(x_, s, t_, y)  # noqa: E731
    out, tout = _compare(model, fn, (x, t), (torch.randn_like(x), torch.ones(B)))
    assert out.shape == x.shape and tout.shape == x.shape


def test_dit_null_class_and_unconditional():
    torch.manual_seed(0)
    model = dit_tiny(hidden_size=32, num_heads=2)
    _randomise(model, 4)
    x, s, t = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.ones(2)
    a = model(x, s, t)
    b = model(x, s, t, torch.full((2,), model.num_classes))
    assert torch.equal(a, b)
    assert not torch.allclose(a, model(x, s, t, torch.tensor([0, 1])))
    unc = dit_tiny(hidden_size=32, num_heads=2, num_classes=0)
    assert unc(x, s, t).shape == x.shape
    with pytest.raises(ValueError, match="y"):
        unc(x, s, t, torch.tensor([0, 1]))


def test_dit_depends_on_both_times_and_checks_inputs():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    _randomise(model, 5)
    x = torch.randn(2, 3, 8, 8)
    s, t = torch.tensor([0.1, 0.2]), torch.tensor([0.7, 0.9])
    base = model(x, s, t)
    assert not torch.allclose(base, model(x, s + 0.1, t))
    assert not torch.allclose(base, model(x, s, t + 0.1))
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 1, 8, 8), s, t)
    with pytest.raises(ValueError, match="t"):
        model(x, s, torch.tensor(0.5))


def test_patchify_roundtrip():
    model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=0)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_adaln_zero_initialisation_outputs_zero():
    model = dit_tiny()
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(model(x, torch.zeros(2), torch.ones(2))) == 0


def test_dit_jvp_along_parameters():
    """Weight tangents (functional_call): tW x products appear only where the weights have tangents."""
    torch.manual_seed(0)
    model = dit_tiny(hidden_size=32, num_heads=2, qk_norm=True)
    _randomise(model, 6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(7)
    tangents = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    x, s, t = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2)
    f = lambda p: torch.func.functional_call(model, p, (x, s, t))  # noqa: E731
    res = {}
    for backend in ("auto", "naive"):
        with fk.use_backend(backend):
            res[backend] = torch.func.jvp(f, (params,), (tangents,))
    for a, b in zip(res["auto"], res["naive"]):
        assert rel_err(a, b) < TOL


def test_float64_dit_is_float64_throughout():
    """A float64 DiT computes its time embedding in float64 too: its explicit-tangent form (fk.func.jvp) and
    torch.func.jvp over the naive ops agree to float64 rounding, along x and both times."""
    from flowmap_kernels.nn.layers import timestep_embedding
    t = torch.rand(5, dtype=torch.float64)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * torch.arange(8, dtype=torch.float64) / 8)
    args = 1000.0 * t[:, None] * freqs[None]
    assert rel_err(timestep_embedding(t, 16), torch.cat([args.cos(), args.sin()], -1)) < 1e-13
    torch.manual_seed(0)
    model = dit_tiny(hidden_size=32, depth=1, num_heads=2, num_classes=10).double()
    _randomise(model, 4)
    x, tx = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    s, t = torch.rand(2, dtype=torch.float64) * 0.5, 0.5 + torch.rand(2, dtype=torch.float64) * 0.5
    y = torch.tensor([1, 4])
    primals, tangents = (x, s, t), (tx, torch.full_like(s, 0.3), torch.ones_like(t))
    fn = lambda x_, s_, t_: model(x_, s_, t_, y)  # noqa: E731
    v, tv = fk.func.jvp(fn, primals, tangents)
    with fk.use_backend("naive"):
        v0, tv0 = torch.func.jvp(fn, primals, tangents)
    assert rel_err(v, v0) < 1e-12 and rel_err(tv, tv0) < 1e-12


# ------------------------------------------------------------------ constructor and input checks

@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0), "num_heads: expected an integer >= 1, got 0"),
    (dict(num_heads=-2), "num_heads: expected an integer >= 1, got -2"),
    (dict(hidden_size=36, num_heads=8), "num_heads: 8 does not divide hidden_size 36"),
    (dict(hidden_size=64.0), "hidden_size: expected an integer >= 1, got 64.0"),
    (dict(patch_size=0), "patch_size: expected an integer >= 1, got 0"),
    (dict(patch_size=-2), "patch_size: expected an integer >= 1, got -2"),
    (dict(input_size=0), "input_size: expected an integer >= 1, got 0"),
    (dict(depth=-1), "depth: expected an integer >= 0, got -1"),
    (dict(in_channels=0), "in_channels: expected an integer >= 1, got 0"),
    (dict(out_channels=0), "out_channels: expected an integer >= 1, got 0"),
    (dict(num_classes=-1), "num_classes: expected an integer >= 0, got -1"),
    (dict(freq_dim=1), "freq_dim: expected an integer >= 2, got 1"),
    (dict(mlp_ratio=0), "mlp_ratio: expected a positive number"),
    (dict(mlp_ratio=-1.0), "mlp_ratio: expected a positive number"),
])
def test_dit_bad_hyperparameters_name_the_argument(kwargs, message):
    cfg = dict(hidden_size=32, num_heads=2)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        dit_tiny(**cfg)


@pytest.mark.parametrize("build, message", [
    (lambda: Attention(32, 0), "num_heads: expected an integer >= 1, got 0"),
    (lambda: Attention(0, 4), "dim: expected an integer >= 1, got 0"),
    (lambda: Attention(32, 2.0), "num_heads: expected an integer >= 1, got 2.0"),
    (lambda: DiTBlock(32, 4, mlp_ratio=0), "mlp_ratio: expected a positive number"),
    (lambda: DiTBlock(32, 4, eps=-1.0), "eps: expected a non-negative float"),
    (lambda: Linear(-1, 4), "in_features: expected an integer >= 0, got -1"),
    (lambda: Linear(4, 2.5), "out_features: expected an integer >= 0, got 2.5"),
    (lambda: RMSNorm(-1), "dim: expected an integer >= 1, got -1"),
    (lambda: TimestepEmbedder(32, freq_dim=0), "freq_dim: expected an integer >= 2, got 0"),
    (lambda: LabelEmbedder(-1, 32), "num_classes: expected an integer >= 0, got -1"),
    (lambda: MLPFlowMap(hidden=0), "hidden: expected an integer >= 1, got 0"),
    (lambda: MLPFlowMap(depth=-1), "depth: expected an integer >= 0, got -1"),
    (lambda: MLPFlowMap(emb_dim=0), "emb_dim: expected an integer >= 2, got 0"),
    (lambda: MLPFlowMap(emb_dim=3), "emb_dim: must be even"),
    (lambda: MLPFlowMap(shape=(0,)), "shape: expected an integer >= 1, got 0"),
    (lambda: MLPFlowMap(shape=2), "shape: expected a tuple of per-sample sizes"),
    (lambda: MLPFlowMap(num_classes=-1), "num_classes: expected an integer >= 0, got -1"),
    (lambda: MLPFlowMap(max_freq=0), "max_freq: expected a positive number, got 0"),
])
def test_modules_bad_hyperparameters_name_the_argument(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_sizes_accept_numpy_integers_and_linear_zero_features():
    import numpy as np
    m = DiT(input_size=np.int64(4), patch_size=np.int64(2), hidden_size=np.int64(16), depth=np.int64(1),
            num_heads=np.int64(2), freq_dim=np.int64(8))
    assert m(torch.randn(1, 1, 4, 4), torch.zeros(1), torch.ones(1)).shape == (1, 1, 4, 4)
    assert Linear(0, 3).weight.shape == (3, 0)


@pytest.mark.parametrize("y, message", [
    (torch.tensor([1, 2, 3]), "shape (3,)"),
    (torch.tensor([[1], [2]]), "shape (2, 1)"),
    (torch.tensor([1.0, 2.0]), "torch.float32"),
    ([1, 2], "list"),
])
@pytest.mark.parametrize("entry", ["forward", "forward_jvp"])
def test_dit_bad_labels_name_y(y, message, entry):
    model = dit_tiny(hidden_size=32, num_heads=2)
    x, s, t = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2)
    with pytest.raises(ValueError, match=r"y: expected int64 .* shape \(2,\).*" + re.escape(message)):
        if entry == "forward":
            model(x, s, t, y)
        else:
            model.forward_jvp(x, s, t, x, s, t, y=y)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_classes=3, null_class=True, guidance_dim=3, aux_velocity=True)])
def test_mlp_flow_map_empty_batch(kwargs):
    """A batch of 0 (the DiT takes one too): x.reshape(b, -1) cannot infer -1 from 0 elements."""
    m = MLPFlowMap(shape=(2, 3), hidden=8, depth=1, **kwargs)
    x = torch.randn(0, 2, 3)
    assert m(x, torch.rand(0), torch.rand(0)).shape == (0, 2, 3)
    _, tv = torch.func.jvp(lambda a: m(a, 0.5, 0.25), (x,), (x,))
    assert tv.shape == (0, 2, 3)
    if kwargs:
        assert m(x, 0.5, 0.25, w=torch.ones(0, 3)).shape == (0, 2, 3)
