"""iMF's auxiliary velocity head (aux_head=True; methods/imf.py, arXiv:2512.02012): the loss against a
float64 reference written from the formula (finite differences for the JVP), where the gradients go,
the model side (MLPFlowMap / nn.DiT aux_velocity) and the default path left alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flowmap_kernels.methods import METHODS, uses_aux_velocity
from flowmap_kernels.models import MLPFlowMap
from tests.methods.helpers import pair, tiny_mlp
from tests.numerics import rel_err

imf = METHODS["imf"]


def aux_mlp(seed=0, **kw):
    """tiny_mlp with the auxiliary head, its last layer random too (v_aux non-trivial from the start)."""
    m = tiny_mlp(seed=seed, aux_velocity=True, **kw)
    torch.manual_seed(seed + 100)
    nn.init.normal_(m.aux_out.weight, std=0.3)
    nn.init.normal_(m.aux_out.bias, std=0.1)
    return m


def reference_loss(model, x0, c, seed):
    """The documented aux-head loss from scratch in float64: noise, then the (s, t) pair drawn in the
    method's order from a generator seeded like the loss's; dV by central differences along
    (v_aux, 1, 0); adaptive weight sg[1 / (err + c)^p] on the per-sample sum; plus aux_weight times the
    head's flow-matching error (per-sample mean)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs, v = (1 - s[:, None]) * x0 + s[:, None] * eps, eps - x0
    V, va = model(xs, s, t, aux=True)
    with torch.no_grad():
        h = 1e-6
        vh = va.detach()
        dV = (model(xs + h * vh, s + h, t) - model(xs - h * vh, s - h, t)) / (2 * h)
    W = V - (t - s)[:, None] * dV
    err = (W - v).pow(2).sum(1)
    weight = 1.0 / (err.detach() + c["adaptive_c"]).pow(c["adaptive_p"])
    return (weight * err).mean() + c["aux_weight"] * (va - v).pow(2).mean(1).mean()


@pytest.mark.parametrize("aux_weight", [1.0, 0.5])
def test_aux_head_loss_and_gradients_match_the_reference_float64(aux_weight):
    model = aux_mlp()
    x0 = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = {**imf.DEFAULTS, "aux_head": True, "aux_weight": aux_weight}
    lo, logs = imf.loss(model, x0, aux_head=True, aux_weight=aux_weight, generator=torch.Generator().manual_seed(7))
    ref = reference_loss(model, x0, c, 7)
    assert rel_err(lo, ref) < 1e-8
    assert set(logs) == {"loss", "mse", "aux"}
    params = list(model.parameters())
    ga = torch.autograd.grad(lo, params)
    gb = torch.autograd.grad(reference_loss(model, x0, c, 7), params)
    for p, a, b in zip(model.parameters(), ga, gb):
        assert rel_err(a, b) < 1e-6, p.shape


def test_aux_head_gets_its_gradient_only_from_its_own_term():
    """The head is trained by its flow-matching term; as the JVP tangent it is under stop-gradient, so with
    aux_weight = 0 it receives no gradient at all, while the backbone and the main head still do."""
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for w, expect_grad in ((1.0, True), (0.0, False)):
        model = aux_mlp()
        lo, _ = imf.loss(model, x0, aux_head=True, aux_weight=w, generator=torch.Generator().manual_seed(3))
        lo.backward()
        head = torch.cat([model.aux_out.weight.grad.reshape(-1), model.aux_out.bias.grad])
        assert bool(head.abs().sum() > 0) is expect_grad
        assert model.out.weight.grad.abs().sum() > 0 and model.inp.weight.grad.abs().sum() > 0


def test_aux_head_needs_a_model_with_the_head_and_default_is_unchanged():
    x0 = torch.randn(8, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="aux_head"):
        imf.loss(tiny_mlp(), x0, aux_head=True)
    with pytest.raises(ValueError, match="aux_weight"):
        imf.loss(aux_mlp(), x0, aux_head=True, aux_weight=-1.0)
    assert imf.DEFAULTS["aux_head"] is False and not uses_aux_velocity(imf)
    assert uses_aux_velocity(imf, {"aux_head": True})
    # the default loss on a model that has the head: the head is never called, the result is the plain one
    plain, with_head = tiny_mlp(), aux_mlp()
    with_head.load_state_dict(plain.state_dict(), strict=False)  # same weights but the (extra) head
    a, _ = imf.loss(plain, x0, generator=torch.Generator().manual_seed(5))
    b, _ = imf.loss(with_head, x0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_mlp_head_is_created_last_and_is_opt_in():
    """aux_velocity=True adds one zero-initialised layer after everything else: the other parameters draw the
    same initial values, and model(...) without aux returns V as before."""
    torch.manual_seed(0)
    a = MLPFlowMap((2,), hidden=16, depth=2)
    torch.manual_seed(0)
    b = MLPFlowMap((2,), hidden=16, depth=2, aux_velocity=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) - set(sa) == {"aux_out.weight", "aux_out.bias"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not b.aux_out.weight.any() and not b.aux_out.bias.any()
    x, s = torch.randn(5, 2), torch.rand(5)
    V, va = b(x, s, s * 0.5, aux=True)
    assert torch.equal(V, b(x, s, s * 0.5)) and torch.equal(V, a(x, s, s * 0.5)) and va.shape == x.shape
    with pytest.raises(ValueError, match="aux"):
        a(x, s, s, aux=True)


def test_aux_head_with_guidance_inputs_trains_the_head():
    model = aux_mlp(num_classes=3, null_class=True, guidance_dim=3)
    x0 = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.arange(16) % 3
    lo, logs = imf.loss(model, x0, cond=y, aux_head=True, cfg_omega_max=2.0, cfg_dropout=0.2,
                        generator=torch.Generator().manual_seed(6))
    assert torch.isfinite(lo) and torch.isfinite(logs["aux"])
    lo.backward()
    assert model.aux_out.weight.grad.abs().sum() > 0 and model.emb_w.net[0].weight.grad.abs().sum() > 0


def test_dit_aux_head():
    from flowmap_kernels.nn import dit_tiny
    torch.manual_seed(0)
    plain = dit_tiny(hidden_size=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    m = dit_tiny(hidden_size=32, depth=1, num_heads=2, aux_velocity=True)
    sp, sm = plain.state_dict(), m.state_dict()
    assert all(torch.equal(sp[k], sm[k]) for k in sp) and any(k.startswith("aux_final_layer") for k in sm)
    for p in m.aux_final_layer.parameters():  # non-zero head: its output depends on the input
        nn.init.normal_(p, std=0.05)
    x, s, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    V, va = m(x, s, 0.5 * s, y=y, aux=True)
    assert va.shape == V.shape == x.shape and torch.equal(V, m(x, s, 0.5 * s, y=y))
    lo, _ = imf.loss(m, x, cond=y, aux_head=True, generator=torch.Generator().manual_seed(0))
    lo.backward()
    assert m.aux_final_layer.linear.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="aux"):
        plain(x, s, s, y=y, aux=True)
