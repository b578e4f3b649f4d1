"""Classifier-free guidance in the losses (label dropout, MeanFlow's guided target, iMF's guidance input,
TVM's scaled guidance), sCM's learned weighting and TrigFlow parameterisation, TVM's time pairs:
each against a slow float64 reference in the style of test_losses.py (same draws from an identically
seeded generator, derivatives by central finite differences, stop-gradients by explicit detach, one
example at a time where the method works on the batch)."""
from __future__ import annotations

import math

import pytest
import torch

from flowmap_kernels.methods import METHODS, prepare_model
from flowmap_kernels.methods._common import drop_labels, null_label, sample_guidance_scale
from flowmap_kernels.models import MLPFlowMap, TimeWeight, TrigFlowParam
from tests.methods.helpers import grad_rel, pair, params_grad, tiny_mlp, times
from tests.numerics import rel_err

H = 2e-6
B = 7
NC = 3  # classes; label 3 is the null class


def _b(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _x0(shape=(2,)):
    return torch.randn((B, *shape), generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def _labels():
    return torch.tensor([0, 1, 2, 0, 1, 2, 1])


def _drop(g, p, y):
    """The label-dropout draw (one float32 uniform per example, the method's first draw)."""
    d = torch.rand(y.shape[0], generator=g) < p
    return torch.where(d, torch.full_like(y, NC), y), d


def _adaptive_sum(pred, target, c):
    err = (pred - target).pow(2).reshape(pred.shape[0], -1).sum(1)
    return (err / (err.detach() + c["adaptive_c"]) ** c["adaptive_p"]).mean()


def _fd(f, x, s, t, tx, ts, tt):
    return (f(x + H * tx, s + H * ts, t + H * tt) - f(x - H * tx, s - H * ts, t - H * tt)) / (2 * H)


# ------------------------------------------------------------------------------------------ label dropout

def test_label_dropout_draws_nothing_when_off_and_needs_a_null_class():
    y = _labels()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    m = tiny_mlp(num_classes=NC, null_class=True)
    assert drop_labels(m, y, 0.0, g)[0] is y and torch.equal(g.get_state(), state)
    assert drop_labels(m, None, 0.5, g) == (None, None) and torch.equal(g.get_state(), state)
    yd, d = drop_labels(m, y, 1.0, g)
    assert d.all() and (yd == NC).all() and null_label(m) == NC
    with pytest.raises(ValueError, match="cfg_dropout: classifier-free guidance needs a model with a null class"):
        drop_labels(tiny_mlp(num_classes=NC), y, 0.1)
    with pytest.raises(ValueError, match="cfg_dropout: expected a probability"):
        drop_labels(m, y, 1.5)
    from flowmap_kernels.nn import dit_tiny
    assert null_label(dit_tiny(num_classes=10)) == 10


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_drops_labels_to_the_null_class(name):
    """cfg_dropout = 1: the loss equals the loss with every label set to the null class; 0: unchanged."""
    model = prepare_model(METHODS[name], tiny_mlp(num_classes=NC, null_class=True))
    x0, y = _x0(), _labels()
    def run(cond, **kw):
        return METHODS[name].loss(model, x0, cond=cond, generator=torch.Generator().manual_seed(4), **kw)[0]
    dropped = run(y, cfg_dropout=1.0)
    g = torch.Generator().manual_seed(4)
    torch.rand(B, generator=g)  # the dropout draw, then the same stream as the method's
    null = torch.full_like(y, NC)
    # the null-label loss with the generator advanced past the dropout draw
    ref = METHODS[name].loss(model, x0, cond=null, generator=g)[0]
    assert float(dropped) == float(ref)
    assert float(run(y, cfg_dropout=0.0)) == float(run(y))


def test_mlp_defaults_unchanged_and_null_class_is_y_none():
    torch.manual_seed(3)
    a = MLPFlowMap((2,), hidden=16, depth=1, emb_dim=8, num_classes=NC)
    assert a.emb_y.num_embeddings == NC and a.emb_w is None and a.null_label is None
    assert a.inp.in_features == 2 + 3 * 8
    m = tiny_mlp(num_classes=NC, null_class=True, guidance_dim=3)
    x, s, t = _x0(), torch.rand(B, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    assert torch.equal(m(x, s, t), m(x, s, t, y=torch.full((B,), NC)))
    neutral = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64).expand(B, 3)
    assert torch.equal(m(x, s, t, y=_labels()), m(x, s, t, y=_labels(), w=neutral))
    two = torch.full((B,), 2.0, dtype=torch.float64)
    assert not torch.equal(m(x, s, t, y=_labels()), m(x, s, t, y=_labels(), w=two))
    with pytest.raises(ValueError, match="w: this model has no guidance input"):
        a(x.float(), s.float(), t.float(), y=_labels(), w=torch.ones(B))
    with pytest.raises(ValueError, match="null_class: needs num_classes"):
        MLPFlowMap(null_class=True)
    with pytest.raises(ValueError, match="guidance_dim: expected 1"):
        MLPFlowMap(guidance_dim=2)


# ---------------------------------------------------------------------------------- MeanFlow guided target

def ref_meanflow_cfg(model, x0, y, g, c):
    yd, dropped = _drop(g, c["cfg_dropout"], y)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    lo, hi = c["cfg_interval"]
    om, ka = c["cfg_scale"], c["cfg_kappa"]
    vg = v.clone()
    with torch.no_grad():
        for i in range(B):  # one example at a time
            if dropped[i] or not lo <= float(s[i]) <= hi:
                continue
            sl = s[i:i + 1]
            uc = model(xs[i:i + 1], sl, sl, y=y[i:i + 1])
            uu = model(xs[i:i + 1], sl, sl, y=torch.tensor([NC]))
            vg[i] = (om * v[i:i + 1] + ka * uc + (1 - om - ka) * uu)[0]
        f = lambda a, b, d: model(a, b, d, y=yd)
        target = vg + _b(t - s, x0) * _fd(f, xs, s, t, vg, torch.ones_like(s), torch.zeros_like(t))
    return _adaptive_sum(model(xs, s, t, y=yd), target, c)


@pytest.mark.parametrize("cfg", [
    {"cfg_dropout": 0.3, "cfg_scale": 2.0, "cfg_kappa": 0.0},
    {"cfg_dropout": 0.4, "cfg_scale": 1.5, "cfg_kappa": 0.3, "cfg_interval": [0.2, 0.9], "time_dist": "uniform",
     "ratio_neq": 0.6, "adaptive_c": 0.5},
])
def test_meanflow_guided_target_matches_reference(cfg):
    model = tiny_mlp(num_classes=NC, null_class=True)
    x0, y = _x0(), _labels()
    c = {**METHODS["meanflow"].DEFAULTS, **cfg}
    lo, _ = METHODS["meanflow"].loss(model, x0, cond=y, generator=torch.Generator().manual_seed(5), **cfg)
    ref = ref_meanflow_cfg(model, x0, y, torch.Generator().manual_seed(5), c)
    assert rel_err(lo.detach(), ref.detach()) < 1e-6, (float(lo), float(ref))
    assert grad_rel(params_grad(lo, model), params_grad(ref, model)) < 1e-5
    plain, _ = METHODS["meanflow"].loss(model, x0, cond=y, generator=torch.Generator().manual_seed(5),
                                        **{**cfg, "cfg_scale": 1.0, "cfg_kappa": 0.0})
    assert float(plain) != float(lo)


def test_meanflow_adaptive_weight_is_on_the_per_sample_sum():
    """The default reduction: w = 1 / (sum of squares + c); on D = 12 dims that is c * 12 on the mean."""
    model = tiny_mlp((3, 2, 2))
    x0 = _x0((3, 2, 2))
    s_lo, _ = METHODS["meanflow"].loss(model, x0, generator=torch.Generator().manual_seed(2), adaptive_c=0.6)
    m_lo, _ = METHODS["meanflow"].loss(model, x0, generator=torch.Generator().manual_seed(2), adaptive_c=0.05,
                                       adaptive_reduce="mean")
    assert abs(float(s_lo) - float(m_lo)) < 1e-9  # err_sum / (err_sum + 0.6) = err_mean / (err_mean + 0.05)
    with pytest.raises(ValueError, match="adaptive_reduce: expected one of"):
        METHODS["meanflow"].loss(model, x0, adaptive_reduce="max")


# ---------------------------------------------------------------------------------------- iMF guidance input

def ref_imf_cfg(model, x0, y, g, c, k):
    yd, dropped = _drop(g, c["cfg_dropout"], y)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    u = torch.rand(B, generator=g, dtype=x0.dtype)
    beta, top = c["cfg_beta"], math.log(1 + c["cfg_omega_max"])
    # inverse CDF of the density ~ omega^-beta on [1, 1 + omega_max]
    omega = torch.tensor([math.exp(float(ui) * top) if beta == 1 else
                          (1 + float(ui) * ((1 + c["cfg_omega_max"]) ** (1 - beta) - 1)) ** (1 / (1 - beta))
                          for ui in u], dtype=x0.dtype)
    omega = torch.where(dropped, torch.ones_like(omega), omega)
    if k == 3:
        lo_r = 0.5 * torch.rand(B, generator=g, dtype=x0.dtype)
        hi_r = 0.5 + 0.5 * torch.rand(B, generator=g, dtype=x0.dtype)
        lo = torch.where(s == t, torch.zeros_like(s), lo_r)
        hi = torch.where(s == t, torch.ones_like(s), hi_r)
    else:
        lo, hi = torch.full_like(s, c["cfg_interval"][0]), torch.full_like(s, c["cfg_interval"][1])
    om_e = torch.where((s >= lo) & (s <= hi), omega, torch.ones_like(omega))
    w_in = torch.stack([omega, lo, hi], 1) if k == 3 else om_e
    w_one = torch.tensor([[1.0, 0.0, 1.0]], dtype=x0.dtype).expand(B, 3) if k == 3 else torch.ones_like(s)
    with torch.no_grad():
        vc = model(xs, s, s, y=yd, w=w_in)
        vu = model(xs, s, s, y=torch.full_like(y, NC), w=w_one)
        vg = v + _b(1 - 1 / om_e, v) * (vc - vu)
        f = lambda a, b, d: model(a, b, d, y=yd, w=w_in)
        dV = _fd(f, xs, s, t, vc, torch.ones_like(s), torch.zeros_like(t))
    W = model(xs, s, t, y=yd, w=w_in) - _b(t - s, x0) * dV
    return _adaptive_sum(W, vg, c)


@pytest.mark.parametrize("k,cfg", [
    (3, {"cfg_dropout": 0.3, "cfg_omega_max": 6.0}),
    (1, {"cfg_dropout": 0.2, "cfg_omega_max": 3.0, "cfg_beta": 2.0, "cfg_interval": [0.3, 0.8],
         "time_dist": "uniform"}),
])
def test_imf_guidance_input_matches_reference(k, cfg):
    model = tiny_mlp(num_classes=NC, null_class=True, guidance_dim=k)
    x0, y = _x0(), _labels()
    c = {**METHODS["imf"].DEFAULTS, **cfg}
    lo, _ = METHODS["imf"].loss(model, x0, cond=y, generator=torch.Generator().manual_seed(6), **cfg)
    ref = ref_imf_cfg(model, x0, y, torch.Generator().manual_seed(6), c, k)
    assert rel_err(lo.detach(), ref.detach()) < 1e-6, (float(lo), float(ref))
    assert grad_rel(params_grad(lo, model), params_grad(ref, model)) < 1e-5
    with pytest.raises(ValueError, match="cfg_omega_max: guidance as a model input needs a model"):
        METHODS["imf"].loss(tiny_mlp(num_classes=NC, null_class=True), x0, cond=y, **cfg)


def test_guidance_scale_distribution():
    g = torch.Generator().manual_seed(0)
    w = sample_guidance_scale(200_000, 7.0, 1.0, generator=g, dtype=torch.float64)
    assert w.min() >= 1 and w.max() <= 8
    assert abs(float(torch.log(w).mean()) - math.log(8) / 2) < 5e-3  # log-uniform on [1, 8]
    w2 = sample_guidance_scale(200_000, 7.0, 2.0, generator=g, dtype=torch.float64)
    # density ~ w^-2 on [1, 8]: P(w <= 2) = (1 - 1/2) / (1 - 1/8)
    assert abs(float((w2 <= 2).double().mean()) - 0.5 / 0.875) < 5e-3


# ---------------------------------------------------------------------------------- TVM scaled guidance

def ref_tvm_cfg(model, teacher, x0, y, g, c):
    yd, dropped = _drop(g, c["cfg_dropout"], y)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    lo_w, hi_w = c["cfg_scale_range"]
    om = lo_w + (hi_w - lo_w) * torch.rand(B, generator=g, dtype=x0.dtype)
    om = torch.where(dropped, torch.ones_like(om), om)
    ob = _b(om, x0)
    xs = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps
    F = lambda tt: xs + _b(tt - s, x0) * ob * model(xs, s, tt, y=yd, w=om)  # scaled parameterisation
    dFdt = (F(t + H) - F(t - H)) / (2 * H)
    with torch.no_grad():
        u = ob * teacher(F(t), t, t, y=yd, w=om)
    lag = ((dFdt - u) / ob).pow(2).reshape(B, -1).mean(1).mean()
    r = times(B, c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], g)
    eps2 = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xr = (1 - _b(r, x0)) * x0 + _b(r, x0) * eps2
    with torch.no_grad():
        target = ob * (eps2 - x0) + (1 - ob) * teacher(xr, r, r, y=torch.full_like(y, NC), w=torch.ones_like(om))
    fm = ((ob * model(xr, r, r, y=yd, w=om) - target) / ob).pow(2).reshape(B, -1).mean(1).mean()
    return c["lag_weight"] * lag + c["fm_weight"] * fm


def test_tvm_scaled_guidance_matches_reference():
    model = tiny_mlp(num_classes=NC, null_class=True, guidance_dim=1)
    teacher = tiny_mlp(num_classes=NC, null_class=True, guidance_dim=1, seed=1)
    x0, y = _x0(), _labels()
    cfg = {"cfg_dropout": 0.3, "cfg_scale_range": [1.0, 3.0], "fm_weight": 0.7}
    c = {**METHODS["tvm"].DEFAULTS, **cfg}
    lo, logs = METHODS["tvm"].loss(model, x0, cond=y, teacher=teacher, generator=torch.Generator().manual_seed(8),
                                   **cfg)
    ref = ref_tvm_cfg(model, teacher, x0, y, torch.Generator().manual_seed(8), c)
    assert rel_err(lo.detach(), ref.detach()) < 1e-6, (float(lo), float(ref))
    assert grad_rel(params_grad(lo, model), params_grad(ref, model)) < 1e-5
    assert float(logs["omega"]) > 1
    # a fixed scale of 1 with scale_param is the unguided loss (omega = 1 everywhere)
    fixed = METHODS["tvm"].loss(model, x0, cond=y, teacher=teacher, generator=torch.Generator().manual_seed(8),
                                cfg_scale=1.0)[0]
    plain = METHODS["tvm"].loss(model, x0, cond=y, teacher=teacher, generator=torch.Generator().manual_seed(8))[0]
    assert float(fixed) == float(plain)


def test_tvm_time_pairs_follow_the_paper():
    """Default pairs: gap = sigmoid(N(-0.8, 1)), target logit-normal(-0.4, 1) truncated to <= 1 - gap."""
    from flowmap_kernels.methods._common import sample_gap_pair
    c = METHODS["tvm"].DEFAULTS
    s, t = sample_gap_pair(200_000, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (s >= t).all() and (s <= 1).all() and (t >= 0).all()
    gap = s - t
    assert abs(float(torch.logit(gap).mean()) + 0.8) < 0.01 and abs(float(torch.logit(gap).std()) - 1.0) < 0.01
    # small gaps leave the target almost untruncated: its logit is then close to N(-0.4, 1)
    lt = torch.logit(t[gap < 0.05])
    assert abs(float(lt.mean()) + 0.4) < 0.05


# -------------------------------------------------------------------------------------------- sCM options

def test_scm_learned_weighting_matches_reference():
    model = prepare_model(METHODS["scm"], tiny_mlp())
    assert isinstance(model.loss_weight, TimeWeight)
    model.loss_weight.to(torch.float64)
    torch.nn.init.normal_(model.loss_weight.out.weight, std=0.5)
    x0 = _x0()
    lo, _ = METHODS["scm"].loss(model, x0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s = times(B, "logit_normal", -1.0, 1.4, g)
    lw = model.loss_weight(s)
    mse_i = _scm_per_sample(model, x0, 5)
    ref = (torch.exp(lw) * mse_i - lw).mean()
    assert rel_err(lo.detach(), ref.detach()) < 1e-10
    gw = torch.autograd.grad(lo, list(model.loss_weight.parameters()))
    gr = torch.autograd.grad(ref, list(model.loss_weight.parameters()))
    assert grad_rel(gw, gr) < 1e-10
    with pytest.raises(ValueError, match="adaptive_weighting: the model has no loss_weight"):
        METHODS["scm"].loss(tiny_mlp(), x0)


def _scm_per_sample(model, x0, seed):
    """The per-sample squared normalised tangent of the sCM loss, by finite differences in float64."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s = times(B, "logit_normal", -1.0, 1.4, g)
    z = torch.zeros_like(s)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    f = lambda x, ss: x - _b(ss, x) * model(x, ss, z)
    with torch.no_grad():
        dfds = (f(xs + H * v, s + H) - f(xs - H * v, s - H)) / (2 * H)
        gt = dfds / _b(dfds.reshape(B, -1).norm(dim=1) + 0.1, x0)
    return gt.pow(2).reshape(B, -1).mean(1)


@pytest.mark.parametrize("net", ["mlp", "dit"])
def test_trigflow_wrapper_keeps_the_null_class(net):
    """sCM with param="trigflow" wraps the network; the wrapper lost nn.DiT's null class (kept in its label
    table, not as an attribute): label dropout and guided sampling failed with "TrigFlowParam has none"."""
    from flowmap_kernels import sampling
    from flowmap_kernels.nn import dit_tiny
    if net == "dit":
        base, x0 = dit_tiny(input_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=NC), torch.randn(4, 1, 4, 4)
    else:
        base, x0 = MLPFlowMap((2,), hidden=8, depth=1, num_classes=NC, null_class=True), torch.randn(4, 2)
    model = prepare_model(METHODS["scm"], base, {"param": "trigflow"})
    assert isinstance(model, TrigFlowParam) and null_label(model) == NC
    y = torch.tensor([0, 1, 2, 0])
    lo, _ = METHODS["scm"].loss(model, x0, cond=y, param="trigflow", cfg_dropout=0.5)
    assert torch.isfinite(lo)
    out = sampling.sample(METHODS["scm"], model, torch.randn_like(x0), 2, cond=y, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0))
    assert out.shape == x0.shape and torch.isfinite(out).all()
    unconditional = TrigFlowParam(MLPFlowMap((2,), hidden=8, depth=1))
    assert unconditional.null_label is None
    with pytest.raises(ValueError, match="TrigFlowParam has none"):
        null_label(unconditional)


@pytest.mark.parametrize("sigma_d", [1.0, 0.5])
def test_trigflow_parameterisation_is_the_trigflow_consistency_function(sigma_d):
    """V(x_s, s, 0) from the wrapper reproduces f = cos(th) x_th - sin(th) sigma_d F(x_th / sigma_d, .) in
    TrigFlow coordinates: x_s - s V = f, with x_th = cos(th) x0 + sin(th) sigma_d eps the same point."""
    net = tiny_mlp()
    model = TrigFlowParam(net, sigma_d)
    x0, eps = _x0(), torch.randn(B, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.98 + 0.01
    xs = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps
    th = torch.atan(s / ((1 - s) * sigma_d))
    x_th = _b(torch.cos(th), x0) * x0 + _b(torch.sin(th), x0) * sigma_d * eps
    Fv = net(x_th / sigma_d, th * 2 / math.pi, torch.zeros_like(s))
    f = _b(torch.cos(th), x0) * x_th - _b(torch.sin(th), x0) * sigma_d * Fv
    V = model(xs, s, torch.zeros_like(s))
    assert torch.allclose(xs - _b(s, xs) * V, f, atol=1e-12)
    with pytest.raises(ValueError, match="t: TrigFlowParam defines only"):
        model(xs, s, s)
    # the sCM loss trains through the wrapper (JVP included) and refuses an unwrapped network
    wrapped = prepare_model(METHODS["scm"], tiny_mlp(), {"param": "trigflow", "adaptive_weighting": False})
    assert isinstance(wrapped, TrigFlowParam)
    lo, _ = METHODS["scm"].loss(wrapped, x0, param="trigflow", adaptive_weighting=False)
    lo.backward()
    assert all(p.grad is not None for p in wrapped.parameters())
    with pytest.raises(ValueError, match="param: 'trigflow' needs the network wrapped"):
        METHODS["scm"].loss(tiny_mlp(), x0, param="trigflow", adaptive_weighting=False)


def test_shortcut_defaults_follow_the_released_code():
    sc = METHODS["shortcut"]
    assert sc.TEACHER == "ema" and sc.DEFAULTS["sc_fraction"] == 0.125
    assert METHODS["tvm"].TEACHER_EMA_DECAY == 0.99


def test_dit_guidance_input():
    from flowmap_kernels.nn import dit_tiny
    torch.manual_seed(0)
    plain = dit_tiny()
    torch.manual_seed(0)
    guided = dit_tiny(guidance_dim=1)
    assert plain.w_embedder is None and plain.guidance_dim == 0
    # the extra embedder is created last: every other weight is drawn as before
    ps = dict(plain.named_parameters())
    assert all(torch.equal(p, ps[n]) for n, p in guided.named_parameters() if not n.startswith("w_embedder"))
    with torch.no_grad():  # adaLN-Zero: give the zero-initialised layers weights, so outputs depend on c
        for p in guided.parameters():
            if not p.abs().sum():
                p.normal_(std=0.1)
    x, s, t = torch.randn(3, 1, 8, 8), torch.rand(3), torch.zeros(3)
    y = torch.tensor([1, 2, 10])  # 10: the null class
    assert torch.equal(guided(x, s, t, y=y), guided(x, s, t, y=y, w=torch.ones(3)))
    assert not torch.allclose(guided(x, s, t, y=y), guided(x, s, t, y=y, w=torch.full((3,), 3.0)))
    with pytest.raises(ValueError, match="w: this DiT has no guidance input"):
        plain(x, s, t, y=y, w=torch.ones(3))
    x0 = torch.randn(4, 1, 8, 8)
    lo, logs = METHODS["tvm"].loss(guided, x0, cond=torch.tensor([0, 1, 2, 3]), cfg_dropout=0.5, cfg_scale=2.0,
                                   generator=torch.Generator().manual_seed(0))
    lo.backward()
    assert guided.w_embedder.fc1.weight.grad is not None and torch.isfinite(lo)


def test_guidance_input_dim_for_building_the_network():
    from flowmap_kernels.methods import guidance_input_dim
    assert guidance_input_dim(METHODS["imf"]) == 0 and guidance_input_dim(METHODS["tvm"]) == 0
    assert guidance_input_dim(METHODS["imf"], {"cfg_omega_max": 7.0}) == 3
    assert guidance_input_dim(METHODS["imf"], {"cfg_omega_max": 7.0}, "dit") == 1
    assert guidance_input_dim(METHODS["tvm"], {"cfg_scale": 2.0}) == 1
    assert guidance_input_dim(METHODS["tvm"], {"cfg_scale_range": [1.0, 3.0]}) == 1
    assert guidance_input_dim(METHODS["meanflow"], {"cfg_scale": 2.0}) == 0  # trains the guided field itself
    from flowmap_kernels.methods import uses_null_class
    assert not any(uses_null_class(m) for m in METHODS.values())  # the defaults: no CFG
    assert all(uses_null_class(m, {"cfg_dropout": 0.1}) for m in METHODS.values())
    assert uses_null_class(METHODS["meanflow"], {"cfg_kappa": 0.5})
    assert uses_null_class(METHODS["tvm"], {"cfg_scale": 2.0})


def test_batch_velocity_with_dropped_labels():
    """Rows whose label was dropped take the unconditional batch posterior, the others their class's."""
    from flowmap_kernels.methods._common import velocity
    from tests.methods.helpers import marginal_velocity
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(9, 2, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64)
    s = torch.rand(9, generator=g, dtype=torch.float64) * 0.9 + 0.05
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    free = torch.tensor([True, False, False, True, False, True, False, False, False])
    xs = (1 - s[:, None]) * x0 + s[:, None] * eps
    got = velocity("batch", s, x0, eps, y, free=free)
    assert torch.allclose(got, marginal_velocity(xs, s, x0, y, free=free), atol=1e-12)
    assert not torch.allclose(got, marginal_velocity(xs, s, x0, y), atol=1e-6)
    # MeanFlow with the batch velocity and label dropout runs end to end
    model = tiny_mlp(num_classes=3, null_class=True)
    lo, _ = METHODS["meanflow"].loss(model, x0, cond=y, velocity="batch", cfg_dropout=0.5, cfg_scale=2.0)
    assert torch.isfinite(lo)


def test_guidance_without_a_null_class_names_the_setting():
    x0, y = _x0(), _labels()
    with pytest.raises(ValueError, match="cfg_scale: classifier-free guidance needs a model with a null class"):
        METHODS["meanflow"].loss(tiny_mlp(num_classes=NC), x0, cond=y, cfg_scale=2.0)
    from flowmap_kernels import sampling
    with pytest.raises(ValueError, match="guidance_scale: classifier-free guidance needs"):
        sampling.flowmap_sample(tiny_mlp(num_classes=NC), x0, 1, cond=y, guidance_scale=2.0)
    with pytest.raises(ValueError, match="cfg_interval: expected"):
        METHODS["meanflow"].loss(tiny_mlp(num_classes=NC, null_class=True), x0, cond=y, cfg_scale=2.0,
                                 cfg_interval=[0.8, 0.2])
    with pytest.raises(ValueError, match="cfg_scale_range: expected"):
        METHODS["tvm"].loss(tiny_mlp(num_classes=NC, null_class=True, guidance_dim=1), x0, cond=y,
                            cfg_scale_range=[0.0, 2.0])


def test_tvm_time_pairs_reject_settings_they_ignore():
    with pytest.raises(ValueError, match="ratio_neq: time_dist 'tvm' draws only pairs"):
        METHODS["tvm"].loss(tiny_mlp(), _x0(), ratio_neq=0.5)
    with pytest.raises(ValueError, match="time_dist: 'tvm' .* is TVM's"):
        METHODS["lsd"].loss(tiny_mlp(), _x0(), time_dist="tvm")
