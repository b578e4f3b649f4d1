"""Registry, interface attributes, config errors, where backward passes run, and that training lowers each loss."""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.attention import autograd as attn_autograd
from flowmap_kernels.methods import METHODS, get_method, prepare_model
from flowmap_kernels.models import MLPFlowMap
from tests.methods.helpers import TinyAttnFlowMap, tiny_mlp

EXPECTED_FPE = {"fm": 3, "meanflow": 4, "imf": 5, "tvm": 10, "scm": 4, "lsd": 10, "esd": 10, "shortcut": 8, "psd": 8}


def test_registry_names_and_attributes():
    assert set(METHODS) == set(EXPECTED_FPE)
    for name, m in METHODS.items():
        assert m.NAME == name and m.NOMINAL_FPE == EXPECTED_FPE[name]
        assert isinstance(m.CALLS, str) and m.CALLS
        assert isinstance(m.DEFAULTS, dict) and "generator" in m.DEFAULTS
        assert m.SAMPLER in ("flowmap", "euler", "consistency")
        assert m.TEACHER in (None, "self", "ema")
        assert m.__doc__ and len(m.__doc__) > 200
        assert callable(m.loss)


def test_unknown_method_and_config_key_errors():
    with pytest.raises(ValueError, match="unknown method 'nope'.*meanflow"):
        get_method("nope")
    with pytest.raises(TypeError, match="unknown config key.*'lr'"):
        METHODS["meanflow"].loss(tiny_mlp(), torch.zeros(4, 2, dtype=torch.float64), lr=1.0)
    with pytest.raises(ValueError, match="time_dist"):
        METHODS["fm"].loss(tiny_mlp(), torch.zeros(4, 2, dtype=torch.float64), time_dist="beta")


class _Counter:
    """Counts calls of the attention backward kernels: the primal one (attention_backward, 5 matmuls a
    tile) and the one through the JVP (attention_jvp_backward, about 15), as autograd.py calls them."""

    def __init__(self, monkeypatch):
        self.calls = {"attention_backward": 0, "attention_jvp_backward": 0}
        for name in self.calls:
            orig = getattr(attn_autograd.kernels, name)

            def wrapped(*a, _orig=orig, _name=name, **k):
                self.calls[_name] += 1
                return _orig(*a, **k)
            monkeypatch.setattr(attn_autograd.kernels, name, wrapped)


@pytest.mark.parametrize("name,through_jvp", [("meanflow", False), ("scm", False), ("imf", False),
                                              ("tvm", True), ("lsd", True), ("esd", True), ("fm", False)])
def test_backward_through_the_jvp_only_where_the_method_says(name, through_jvp, monkeypatch):
    """MeanFlow/sCM/iMF stop the gradient at the tangent: their backward must never run the backward
    through the JVP, only the primal attention backward. TVM/LSD/ESD backpropagate through the JVP."""
    counter = _Counter(monkeypatch)
    model = prepare_model(METHODS[name], TinyAttnFlowMap())  # sCM: its learned loss weighting attached
    x0 = torch.randn(6, 2, dtype=torch.float64)
    with fk.use_backend("torch"):
        lo, _ = METHODS[name].loss(model, x0, generator=torch.Generator().manual_seed(0))
        lo.backward()
    assert counter.calls["attention_backward"] > 0, counter.calls
    assert (counter.calls["attention_jvp_backward"] > 0) == through_jvp, counter.calls
    assert all(p.grad is not None for p in model.parameters())
    assert (name == "scm") == hasattr(model, "loss_weight")


# the monitored log and the required drop: MeanFlow's adaptive weight keeps its loss near 1, so its raw
# squared error is watched; sCM's squared normalised tangent (its "mse"; the loss adds the learned
# weighting) falls only slowly;
# iMF's semigradient on one fixed batch falls for ~25 steps and then oscillates (moving JVP target).
WATCH = {"meanflow": ("mse", 0.8, 40), "scm": ("mse", 0.98, 40), "imf": ("mse", 0.8, 24)}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_few_steps_lower_the_loss(name):
    """Fixed batch, fixed noise and times (generator reseeded each step): 40 Adam steps lower the loss."""
    torch.manual_seed(0)
    model = prepare_model(METHODS[name], MLPFlowMap(hidden=32, depth=2, emb_dim=16))
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 1.0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    key, factor, steps = WATCH.get(name, ("loss", 0.8, 40))
    vals = []
    for _ in range(steps):
        lo, logs = METHODS[name].loss(model, x0, generator=torch.Generator().manual_seed(7))
        opt.zero_grad()
        lo.backward()
        opt.step()
        vals.append(float(logs[key]))
    assert sum(vals[-5:]) < factor * sum(vals[:5]), vals


@pytest.mark.parametrize("name", sorted(EXPECTED_FPE))
@pytest.mark.parametrize("precision", ["bfloat16-model", "autocast"])
def test_every_loss_runs_in_bfloat16_and_under_autocast(name, precision):
    """A bfloat16 DiT, and a float32 DiT under torch.autocast(bfloat16) (its tangents come out of the model in
    bfloat16 while x_s stays float32): every method gives a finite loss whose backward reaches every trained
    parameter with finite gradients."""
    from flowmap_kernels.nn.dit import DiT
    torch.manual_seed(0)
    method = METHODS[name]
    model = prepare_model(method, DiT(num_classes=10))
    x0, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    if precision == "bfloat16-model":
        model, x0 = model.to(torch.bfloat16), x0.to(torch.bfloat16)
        loss, _ = method.loss(model, x0, cond=y)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = method.loss(model, x0, cond=y)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(g is not None for g in grads) > len(grads) // 2


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_batches(name, batch):
    """Every method takes batches of 1-3 (shortcut and psd: round(B sc_fraction) = 0 consistency examples is a
    pure flow-matching batch, its teacher never called on an empty batch); its loss is finite and differentiable."""
    model = prepare_model(METHODS[name], tiny_mlp())
    x0 = torch.randn(batch, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(batch))
    lo, _ = METHODS[name].loss(model, x0, generator=torch.Generator().manual_seed(0))
    lo.backward()
    assert torch.isfinite(lo) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("x0", [torch.zeros(0, 2, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), None])
def test_empty_or_missing_batch_is_named(name, x0):
    with pytest.raises(ValueError, match=rf"{name}\.loss: x0: expected a tensor \(B, \.\.\.\) with B >= 1"):
        METHODS[name].loss(prepare_model(METHODS[name], tiny_mlp()), x0)


@pytest.mark.parametrize("name", ["shortcut", "psd"])
@pytest.mark.parametrize("fraction", [1.4, -0.2, float("nan")])
def test_sc_fraction_outside_zero_one_is_named_at_any_batch_size(name, fraction):
    """The fraction was checked after rounding B * sc_fraction: 1.4 (or -0.2) of a one-example batch passed, NaN
    crashed in round()."""
    x0 = torch.randn(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sc_fraction: expected a fraction in"):
        METHODS[name].loss(tiny_mlp(), x0, sc_fraction=fraction)


@pytest.mark.parametrize("warmup", [-5, float("nan")])
def test_scm_negative_tangent_warmup_is_named(warmup):
    """A negative warm-up made r = step / warmup_steps negative: the s dV/ds term of the tangent flipped sign."""
    with pytest.raises(ValueError, match="warmup_steps: expected an integer >= 0"):
        METHODS["scm"].loss(tiny_mlp(), torch.randn(3, 2, dtype=torch.float64), adaptive_weighting=False,
                            warmup_steps=warmup, step=2)
