"""Each loss against a slow float64 reference of the same formula on a tiny model.

The reference redraws the same noise and times from an identically seeded generator (in the order the
method documents), computes every derivative by central finite differences (h = 2e-6, float64) instead
of torch.func.jvp, and applies stop-gradients by detaching explicitly. Compared: the loss value and
the gradient w.r.t. all parameters (which checks where gradients flow: through the JVP for TVM/LSD/ESD's
time derivative, only through the prediction for MeanFlow/iMF/sCM).
"""
from __future__ import annotations

import math

import pytest
import torch

from flowmap_kernels.methods import METHODS
from tests.methods.helpers import TinyAttnFlowMap, grad_rel, marginal_velocity, pair, params_grad, tiny_mlp, times
from tests.numerics import rel_err

H = 2e-6
B = 7


def _b(t, x):
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _mse(a, b=None):
    d = a if b is None else a - b
    return d.pow(2).reshape(d.shape[0], -1).mean(1)


def _fd(f, x, s, t, tx, ts, tt):
    """Central difference of f(x, s, t) along (tx, ts, tt): differentiable w.r.t. the parameters."""
    return (f(x + H * tx, s + H * ts, t + H * tt) - f(x - H * tx, s - H * ts, t - H * tt)) / (2 * H)


def _weighted(pred, target, c):
    """MeanFlow's adaptive weighting on the per-sample sum (or, adaptive_reduce='mean', the mean) of squares."""
    d = (pred - target).pow(2).reshape(pred.shape[0], -1)
    err = d.sum(1) if c.get("adaptive_reduce", "mean") == "sum" else d.mean(1)
    w = 1.0 / (err.detach() + c["adaptive_c"]) ** c["adaptive_p"]
    return (w * err).mean()


def _velocity(c, xs, s, x0, v):
    """The conditional velocity v, or with c['velocity'] == 'batch' the batch's marginal one."""
    return marginal_velocity(xs, s, x0) if c["velocity"] == "batch" else v


def ref_fm(model, x0, g, c):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    t = times(x0.shape[0], c["time_dist"], c["time_mu"], c["time_sigma"], g)
    xt = (1 - _b(t, x0)) * x0 + _b(t, x0) * eps
    return _mse(model(xt, t, t), eps - x0).mean()


def ref_meanflow(model, x0, g, c):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    v = _velocity(c, xs, s, x0, v)
    V = model(xs, s, t)
    with torch.no_grad():
        dV = _fd(model, xs, s, t, v, torch.ones_like(s), torch.zeros_like(t))
        target = v + _b(t - s, x0) * dV
    return _weighted(V, target, c)


def ref_imf(model, x0, g, c):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    v = _velocity(c, xs, s, x0, v)
    with torch.no_grad():
        vh = model(xs, s, s)
        dV = _fd(model, xs, s, t, vh, torch.ones_like(s), torch.zeros_like(t))
    W = model(xs, s, t) - _b(t - s, x0) * dV  # v = V - (t - s) dV/ds
    return _weighted(W, v, c)


def ref_scm(model, x0, g, c):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s = times(x0.shape[0], c["time_dist"], c["time_mu"], c["time_sigma"], g)
    z = torch.zeros_like(s)
    xs, v = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps, eps - x0
    v = _velocity(c, xs, s, x0, v)
    f = lambda x, ss: x - _b(ss, x) * model(x, ss, z)  # consistency function F(x, s, 0)
    with torch.no_grad():
        dfds = (f(xs + H * v, s + H) - f(xs - H * v, s - H)) / (2 * H)  # total derivative, theta^- = sg(theta)
        norm = dfds.reshape(B, -1).norm(dim=1)
        gt = dfds / _b(norm + c["tangent_c"], x0)
    value = _mse(gt).mean()
    # surrogate whose gradient w.r.t. f_theta is 2 g / (B D): the continuous-time CT gradient
    D = x0[0].numel()
    surrogate = 2 * (f(xs, s) * gt).sum() / (B * D)
    return value, surrogate


def ref_lagrangian(model, x0, g, c, teacher=None):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps
    F = lambda tt: xs + _b(tt - s, x0) * model(xs, s, tt)  # flow map as a function of the target time
    dFdt = (F(t + H) - F(t - H)) / (2 * H)  # kept differentiable: backprop through the derivative
    with torch.no_grad():
        u = (teacher or model)(F(t), t, t)
    lag = _mse(dFdt, u).mean()
    r = times(x0.shape[0], c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], g)
    eps2 = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xr = (1 - _b(r, x0)) * x0 + _b(r, x0) * eps2
    fm = _mse(model(xr, r, r), eps2 - x0).mean()
    return c["lag_weight"] * lag + c["fm_weight"] * fm


def ref_esd(model, x0, g, c):
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    s, t = pair(x0.shape[0], c, g)
    xs = (1 - _b(s, x0)) * x0 + _b(s, x0) * eps
    F = lambda x, ss: x + _b(t - ss, x0) * model(x, ss, t)
    with torch.no_grad():
        vh = model(xs, s, s)
        spatial = (F(xs + H * vh, s) - F(xs - H * vh, s)) / (2 * H)  # grad_x F . v_hat, stopped
    if c["spatial_sg"]:
        dFds = (F(xs, s + H) - F(xs, s - H)) / (2 * H)
        R = dFds + spatial
    else:
        R = (F(xs + H * vh, s + H) - F(xs - H * vh, s - H)) / (2 * H)
    eul = _mse(R).mean()
    r = times(x0.shape[0], c["fm_time_dist"], c["fm_time_mu"], c["fm_time_sigma"], g)
    eps2 = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    xr = (1 - _b(r, x0)) * x0 + _b(r, x0) * eps2
    return c["eul_weight"] * eul + c["fm_weight"] * _mse(model(xr, r, r), eps2 - x0).mean()


def ref_shortcut(model, x0, g, c):
    n = x0.shape[0]
    M = c["base_steps"]
    nsc = int(round(n * c["sc_fraction"]))
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    r = torch.rand(n - nsc, generator=g, dtype=x0.dtype)
    levels = int(math.log2(M))
    k = torch.randint(0, levels, (nsc,), generator=g)
    u = torch.rand(nsc, generator=g, dtype=x0.dtype)
    total = 0.0
    for i in range(n - nsc):  # flow matching rows, one at a time
        xi = (1 - r[i]) * x0[i:i + 1] + r[i] * eps[i:i + 1]
        total = total + _mse(model(xi, r[i:i + 1], r[i:i + 1]), eps[i:i + 1] - x0[i:i + 1]).sum()
    for i in range(nsc):  # consistency rows: two half steps of size h, then one step of 2h
        j = n - nsc + i
        two_h = 2.0 ** (-int(k[i]))
        s = min(1.0, (math.floor(float(u[i]) * round(1 / two_h)) + 1) * two_h)
        h = two_h / 2
        small = int(k[i]) == levels - 1
        S = lambda v: torch.tensor([v], dtype=x0.dtype)
        xi = (1 - s) * x0[j:j + 1] + s * eps[j:j + 1]
        with torch.no_grad():
            v1 = model(xi, S(s), S(s if small else s - h))
            xm = xi - h * v1
            v2 = model(xm, S(s - h), S(s - h if small else s - 2 * h))
            target = (v1 + v2) / 2
        total = total + c["sc_weight"] * _mse(model(xi, S(s), S(s - two_h)), target).sum()
    return total / n


def ref_psd(model, x0, g, c):
    n = x0.shape[0]
    nsc = int(round(n * c["sc_fraction"]))
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    r = torch.rand(n - nsc, generator=g, dtype=x0.dtype)
    a = times(nsc, c["time_dist"], c["time_mu"], c["time_sigma"], g)
    b = times(nsc, c["time_dist"], c["time_mu"], c["time_sigma"], g)
    gamma = torch.rand(nsc, generator=g, dtype=x0.dtype)
    S = lambda v: torch.tensor([float(v)], dtype=x0.dtype)
    F = lambda m, x, s, t: x + (t - s) * m(x, S(s), S(t))  # the flow map
    total = 0.0
    for i in range(n - nsc):
        xi = (1 - r[i]) * x0[i:i + 1] + r[i] * eps[i:i + 1]
        total = total + _mse(model(xi, r[i:i + 1], r[i:i + 1]), eps[i:i + 1] - x0[i:i + 1]).sum()
    for i in range(nsc):  # F(x, s, t) against the stopped composition F(F(x, s, u), u, t), in units of V
        j = n - nsc + i
        s, t = max(float(a[i]), float(b[i])), min(float(a[i]), float(b[i]))
        u = t + float(gamma[i]) * (s - t)
        xi = (1 - s) * x0[j:j + 1] + s * eps[j:j + 1]
        with torch.no_grad():
            target = F(model, F(model, xi, s, u), u, t)
        total = total + c["sc_weight"] * _mse((F(model, xi, s, t) - target) / (t - s)).sum()
    return total / n


REFS = {"fm": ref_fm, "meanflow": ref_meanflow, "imf": ref_imf, "tvm": ref_lagrangian, "lsd": ref_lagrangian,
        "esd": ref_esd, "shortcut": ref_shortcut, "psd": ref_psd}

CASES = [(name, {}) for name in REFS] + [
    ("meanflow", {"adaptive_p": 0.5, "ratio_neq": 1.0, "time_dist": "uniform"}),
    ("meanflow", {"velocity": "batch", "time_dist": "uniform", "ratio_neq": 0.5, "adaptive_c": 1.0}),
    ("meanflow", {"adaptive_reduce": "mean", "adaptive_c": 0.3}),
    ("imf", {"velocity": "batch"}),
    ("imf", {"adaptive_p": 0.0, "adaptive_reduce": "mean"}),
    ("tvm", {"time_dist": "uniform", "fm_time_mu": 0.0}),
    ("tvm", {"adaptive_p": 0.0, "fm_weight": 0.3, "lag_weight": 2.0}),
    ("esd", {"spatial_sg": False}),
    ("shortcut", {"sc_fraction": 0.5, "base_steps": 8}),
    ("psd", {"sc_fraction": 0.6, "sc_weight": 0.5, "time_dist": "logit_normal", "time_mu": 0.3}),
]


def _x0(shape):
    return torch.randn((B, *shape), generator=torch.Generator().manual_seed(11), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(2,), (1, 3, 2)], ids=["2d", "image-like"])
@pytest.mark.parametrize("name,cfg", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_loss_matches_reference(name, cfg, shape):
    model = tiny_mlp(shape)
    x0 = _x0(shape)
    method = METHODS[name]
    c = {**method.DEFAULTS, **cfg}
    lo, logs = method.loss(model, x0, generator=torch.Generator().manual_seed(5), **cfg)
    ref = REFS[name](model, x0, torch.Generator().manual_seed(5), c)
    assert set(logs) >= {"loss"} and all(v.dim() == 0 and not v.requires_grad for v in logs.values())
    assert rel_err(lo.detach(), ref.detach()) < 1e-6, (float(lo), float(ref))
    err = grad_rel(params_grad(lo, model), params_grad(ref, model))
    assert err < 1e-5, err


@pytest.mark.parametrize("velocity", ["conditional", "batch"])
@pytest.mark.parametrize("shape", [(2,), (1, 3, 2)], ids=["2d", "image-like"])
def test_scm_matches_reference(shape, velocity):
    model = tiny_mlp(shape)
    x0 = _x0(shape)
    c = {**METHODS["scm"].DEFAULTS, "velocity": velocity}
    lo, _ = METHODS["scm"].loss(model, x0, generator=torch.Generator().manual_seed(5), velocity=velocity,
                                adaptive_weighting=False)
    value, surrogate = ref_scm(model, x0, torch.Generator().manual_seed(5), c)
    assert rel_err(lo.detach(), value) < 1e-7
    assert grad_rel(params_grad(lo, model), params_grad(surrogate, model)) < 1e-6


def test_scm_tangent_warmup_scales_the_time_derivative():
    model = tiny_mlp()
    x0 = _x0((2,))
    kw = dict(adaptive_weighting=False)
    full = METHODS["scm"].loss(model, x0, generator=torch.Generator().manual_seed(3), **kw)[0]
    same = METHODS["scm"].loss(model, x0, generator=torch.Generator().manual_seed(3), warmup_steps=10, step=10, **kw)[0]
    half = METHODS["scm"].loss(model, x0, generator=torch.Generator().manual_seed(3), warmup_steps=10, step=5, **kw)[0]
    assert float(same) == float(full) and float(half) != float(full)


@pytest.mark.parametrize("name", ["tvm", "meanflow", "esd"])
def test_attention_model_matches_reference(name):
    """Same check through fk.attention's forward-mode rule (blockwise 'torch' backend)."""
    import flowmap_kernels as fk
    model = TinyAttnFlowMap()
    x0 = _x0((2,))
    method = METHODS[name]
    with fk.use_backend("torch"):
        lo, _ = method.loss(model, x0, generator=torch.Generator().manual_seed(9))
        gl = params_grad(lo, model)
    ref = REFS[name](model, x0, torch.Generator().manual_seed(9), dict(method.DEFAULTS))
    assert rel_err(lo.detach(), ref.detach()) < 1e-7
    assert grad_rel(gl, params_grad(ref, model)) < 1e-6


def test_tvm_uses_the_given_teacher():
    model, teacher = tiny_mlp(seed=0), tiny_mlp(seed=1)
    x0 = _x0((2,))
    lo, _ = METHODS["tvm"].loss(model, x0, teacher=teacher, generator=torch.Generator().manual_seed(2))
    ref = ref_lagrangian(model, x0, torch.Generator().manual_seed(2), dict(METHODS["tvm"].DEFAULTS), teacher=teacher)
    assert rel_err(lo.detach(), ref.detach()) < 1e-7
    assert grad_rel(params_grad(lo, model), params_grad(ref, model)) < 1e-6
    assert all(p.grad is None for p in teacher.parameters())
    self_lo, _ = METHODS["tvm"].loss(model, x0, generator=torch.Generator().manual_seed(2))
    assert float(self_lo) != float(lo)


def test_class_conditional_labels_reach_the_model():
    model = tiny_mlp(num_classes=3)
    x0 = _x0((2,))
    y0, y1 = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long)
    for name in ("meanflow", "tvm", "shortcut", "psd"):
        a, _ = METHODS[name].loss(model, x0, cond=y0, generator=torch.Generator().manual_seed(1))
        b, _ = METHODS[name].loss(model, x0, cond=y1, generator=torch.Generator().manual_seed(1))
        assert float(a) != float(b), name


class GaussianFlowMap(torch.nn.Module):
    """The exact average velocity for data N(0, sig^2 I): x_t = x_s a(t)/a(s), a(u) = sqrt((1-u)^2 sig^2 + u^2)."""

    sig = 0.5

    def a(self, u):
        return torch.sqrt((1 - u) ** 2 * self.sig ** 2 + u ** 2)

    def forward(self, x, s, t, y=None):
        d = t - s
        safe = torch.where(d.abs() < 1e-12, torch.ones_like(d), d)
        ratio = (self.a(t) / self.a(s) - 1) / safe
        inst = ((s - 1) * self.sig ** 2 + s) / self.a(s) ** 2  # a'(s)/a(s), the s = t limit
        return x * _b(torch.where(d.abs() < 1e-12, inst, ratio), x)


def test_consistency_rules_vanish_on_the_exact_flow_map():
    """Sign check of every rule in the project convention, on an exactly known flow map: the
    Lagrangian (TVM/LSD) and Eulerian (ESD) residuals and the shortcut / PSD terms are zero, and iMF's
    compound velocity W equals the marginal velocity V(x, s, s)."""
    model = GaussianFlowMap()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * model.sig
    for name, key in (("tvm", "lagrangian"), ("lsd", "lagrangian"), ("esd", "eulerian"), ("shortcut", "sc"),
                      ("psd", "sc")):
        # shortcut at the former 1/4 fraction: these draws hold no smallest-step pair (whose halves use the
        # instantaneous velocity, exact only as h -> 0)
        kw = {"sc_fraction": 0.25} if name == "shortcut" else {}
        _, logs = METHODS[name].loss(model, x0, generator=torch.Generator().manual_seed(1), **kw)
        assert float(logs[key]) < 1e-18, (name, float(logs[key]))
    s = torch.rand(64, dtype=torch.float64) * 0.9 + 0.1
    t = s * torch.rand(64, dtype=torch.float64)
    xs = torch.randn(64, 2, dtype=torch.float64)
    v = model(xs, s, s)
    V, dV = torch.func.jvp(lambda a, b, c: model(a, b, c), (xs, s, t), (v, torch.ones_like(s), torch.zeros_like(t)))
    assert torch.allclose(V - _b(t - s, xs) * dV, v, atol=1e-12)  # iMF: W = V - (t - s) dV/ds = v
    assert torch.allclose(v + _b(t - s, xs) * dV, V, atol=1e-12)  # MeanFlow's target equals V
