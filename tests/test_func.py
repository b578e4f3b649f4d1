"""flowmap_kernels.func.jvp: the models' dual form (forward_jvp, explicit-tangent ops) against torch.func.jvp,
in float64, module by module; both outputs' gradients; when the dual form is (not) used; methods use it."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowmap_kernels as fk
from flowmap_kernels import func
from flowmap_kernels.models import MLPFlowMap
from flowmap_kernels.nn import (Attention, DiT, DiTBlock, FinalLayer, LabelEmbedder, Linear, Mlp, RMSNorm,
                                TimestepEmbedder)
from tests.numerics import rel_err
from tests.reference import random_parameters_

D = torch.float64


def _randomise(module, std=0.3, seed=0):
    return random_parameters_(module, seed, std)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def _check(module, primals, tangents, kwargs=None, tol=1e-12, grad_tol=1e-10):
    """Dual form == torch.func.jvp (outputs, tangents, and the gradients of a loss on both w.r.t. the
    parameters and the differentiable inputs). grad_tol: looser where the module computes in float32 inside
    (the sinusoidal time features: the gradient w.r.t. the float64 times passes through float32)."""
    kwargs = kwargs or {}
    f = func.bind(module, **kwargs) if kwargs else module
    assert func.has_dual_form(f)
    leaves = [x for x in (*primals, *tangents) if x.is_floating_point()]
    for x in leaves:
        x.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    got = func.jvp(f, primals, tangents)
    want = torch.func.jvp(lambda *a: module(*a, **kwargs), primals, tangents)
    assert len(got) == 2
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < tol, rel_err(a, b)
    assert want[1].abs().max() > 1e-3  # a tangent that could be wrong
    w = _randn(*want[0].shape, seed=7)

    def loss(y, ty):
        return (y * w).sum() + (ty * w.flip(-1)).square().sum()

    gg = torch.autograd.grad(loss(*got), params + leaves, allow_unused=True)
    gw = torch.autograd.grad(loss(*want), params + leaves, allow_unused=True)
    for a, b in zip(gg, gw):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < grad_tol, rel_err(a, b)


@pytest.fixture(autouse=True)
def _fused_backend():
    with fk.use_backend("torch"):
        yield


def test_linear_and_rmsnorm():
    _check(_randomise(Linear(6, 5)).double(), (_randn(2, 3, 6, seed=1),), (_randn(2, 3, 6, seed=2),))
    _check(_randomise(RMSNorm(6), std=1.0).double(), (_randn(2, 3, 6, seed=1),), (_randn(2, 3, 6, seed=2),))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention(qk_norm):
    m = _randomise(Attention(8, 2, qk_norm=qk_norm)).double()
    _check(m, (_randn(2, 5, 8, seed=1),), (_randn(2, 5, 8, seed=2),))


def test_mlp_block_final_layer():
    _check(_randomise(Mlp(8, 16)).double(), (_randn(2, 5, 8, seed=1),), (_randn(2, 5, 8, seed=2),))
    x, c, tx, tc = (_randn(2, 5, 8, seed=1), _randn(2, 8, seed=2), _randn(2, 5, 8, seed=3), _randn(2, 8, seed=4))
    _check(_randomise(DiTBlock(8, 2, mlp_ratio=2.0, qk_norm=True)).double(), (x, c), (tx, tc))
    _check(_randomise(FinalLayer(8, 4)).double(), (x, c), (tx, tc))


def test_timestep_embedder_and_labels():
    t = torch.rand(3, generator=torch.Generator().manual_seed(0), dtype=D)
    _check(_randomise(TimestepEmbedder(8, freq_dim=16), std=0.1).double(), (t,), (_randn(3, seed=1),), tol=1e-11,
           grad_tol=1e-5)
    lab = _randomise(LabelEmbedder(4, 8)).double()
    y = torch.tensor([0, 3, 4])
    emb, temb = lab.forward_jvp(y, 3, "cpu")
    assert torch.equal(emb, lab(y, 3, "cpu")) and torch.equal(temb, torch.zeros_like(emb))


def test_mlp_flow_map_has_no_dual_form_and_takes_torch_func_jvp_bit_for_bit():
    """The 2D MLP has no attention and no fused op: func.jvp is exactly torch.func.jvp there."""
    m = _randomise(MLPFlowMap(shape=(2,), hidden=16, depth=2, emb_dim=8, num_classes=3)).double()
    y = torch.tensor([0, 1, 2, 0])
    f = func.bind(m, y=y)
    assert not func.has_dual_form(f)
    x, s = _randn(4, 2, seed=1), torch.rand(4, generator=torch.Generator().manual_seed(2), dtype=D)
    tt = torch.rand(4, generator=torch.Generator().manual_seed(3), dtype=D)
    primals, tangents = (x, s, tt), (_randn(4, 2, seed=4), torch.ones(4, dtype=D), torch.zeros(4, dtype=D))
    got = func.jvp(f, primals, tangents)
    want = torch.func.jvp(lambda *a: m(*a, y=y), primals, tangents)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and want[1].abs().max() > 1e-3


@pytest.mark.parametrize("qk_norm", [False, True])
def test_dit(qk_norm):
    m = _randomise(DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, freq_dim=16,
                       qk_norm=qk_norm), std=0.15).double()
    x = _randn(2, 1, 8, 8, seed=1)
    s, t = (torch.rand(2, generator=torch.Generator().manual_seed(i), dtype=D) for i in (2, 3))
    _check(m, (x, s, t), (_randn(2, 1, 8, 8, seed=4), _randn(2, seed=5), _randn(2, seed=6)),
           kwargs={"y": torch.tensor([1, 10])}, tol=1e-11, grad_tol=1e-5)


def test_dit_with_guidance_input():
    m = _randomise(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8,
                       guidance_dim=1), std=0.2).double()
    (x, s, t), tangents = _dit_args(4)
    _check(m, (x, s, t), tangents, kwargs={"y": torch.tensor([3, 10]), "w": torch.tensor([1.5, 3.0], dtype=D)},
           tol=1e-11, grad_tol=1e-5)


def test_plain_callables_and_unsupported_modules_run_torch_func_jvp():
    x, tx = _randn(3, 4, seed=0), _randn(3, 4, seed=1)

    def f(a):
        return a.sin() * a

    assert not func.has_dual_form(f)
    got, want = func.jvp(f, (x,), (tx,)), torch.func.jvp(f, (x,), (tx,))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    m = DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8).double()
    assert func.has_dual_form(func.bind(m, y=None))
    h = m.blocks[0].register_forward_hook(lambda *a: None)  # e.g. FSDP2: the dual form would bypass it
    assert not func.has_dual_form(m)
    h.remove()
    assert func.has_dual_form(m)
    m.blocks[0].forward = m.blocks[0].forward  # a replaced forward (activation checkpointing)
    assert not func.has_dual_form(m)
    assert not func.has_dual_form(torch.compile(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1,
                                                    num_heads=2, freq_dim=8)))


class _LayerNormModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x, t):
        return self.out(torch.nn.functional.gelu(self.norm(self.inp(x) * t[:, None])))


@pytest.mark.parametrize("tangent_grad", [True, False])
def test_torch_func_jvp_path_gives_nn_layer_norm_exact_tangent_gradients(tangent_grad):
    """A model without a dual form, with an eager nn.LayerNorm: func.jvp's tangent and the parameter gradients of
    a loss on it match the same model with LayerNorm from mean / var ops (PyTorch 2.13's own gives 0.47 relative
    error here); the LayerNorm patch is not left installed."""
    import copy
    import torch.nn.functional as F
    from tests.reference import with_mean_var_layer_norms_
    model = random_parameters_(_LayerNormModel().double(), 0, std=0.5)
    ref = with_mean_var_layer_norms_(copy.deepcopy(model))
    x, tx, t = _randn(4, 8, seed=2), _randn(4, 8, seed=3), torch.rand(4, dtype=torch.float64)
    original = F.layer_norm
    got = func.jvp(model, (x, t), (tx, torch.ones_like(t)), tangent_grad=tangent_grad)
    want = torch.func.jvp(ref, (x, t), (tx, torch.ones_like(t)))
    assert F.layer_norm is original
    assert rel_err(got[0], want[0]) < 1e-12 and rel_err(got[1], want[1]) < 1e-12
    assert got[1].requires_grad == tangent_grad
    if tangent_grad:
        grads = [torch.cat([g.flatten() for g in torch.autograd.grad(
            ty.square().sum(), list(m.parameters()), allow_unused=True, materialize_grads=True)])
            for ty, m in ((got[1], model), (want[1], ref))]
        assert rel_err(*grads) < 1e-12


def _tiny_dit():
    return _randomise(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8)).double()


class _TwiceDiT(DiT):
    def forward(self, *args, **kwargs):  # forward overridden below the class that wrote forward_jvp
        return 2 * super().forward(*args, **kwargs)


class _LoRALinear(torch.nn.Module):
    """A swapped-in wrapper (LoRA, quantisation) around the package's Linear, without a dual form."""

    def __init__(self, base):
        super().__init__()
        self.base, self.down = base, torch.nn.Linear(base.weight.shape[1], 2, bias=False).double()
        self.up = torch.nn.Linear(2, base.weight.shape[0], bias=False).double()

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


@pytest.mark.parametrize("change", ["subclass_forward", "swapped_submodule", "forward_only_keyword"])
def test_a_model_whose_forward_left_its_dual_form_runs_torch_func_jvp(change):
    """fk.func.jvp equals torch.func.jvp of the forward when forward_jvp no longer computes what forward does: a
    subclass overriding forward, a submodule replaced by one without a dual form, a keyword only forward takes
    (bind(model, aux=False))."""
    m = _tiny_dit()
    kwargs = {"y": torch.tensor([1, 2])}
    if change == "subclass_forward":
        twice = _TwiceDiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8).double()
        twice.load_state_dict(m.state_dict())
        m = twice
    elif change == "swapped_submodule":
        m.blocks[0].attn.proj = _LoRALinear(m.blocks[0].attn.proj)
    else:
        kwargs["aux"] = False
    f = func.bind(m, **kwargs)
    assert not func.has_dual_form(f)
    x, s, t = _randn(2, 1, 4, 4, seed=0), _randn(2, seed=1).abs(), _randn(2, seed=2).abs()
    tangents = (_randn(2, 1, 4, 4, seed=3), torch.zeros(2, dtype=D), torch.ones(2, dtype=D))
    got, want = func.jvp(f, (x, s, t), tangents), torch.func.jvp(f, (x, s, t), tangents)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_submodule_the_forward_never_calls_keeps_the_dual_form():
    """A module attached to the model but not used by its forward (sCM's adaptive loss weight) or a submodule
    of the package's own type does not turn the dual form off."""
    from flowmap_kernels.models import TimeWeight
    m = _tiny_dit()
    m.loss_weight = TimeWeight().double()
    assert func.has_dual_form(m)
    m.blocks[0].attn.proj = Linear(16, 16).double()
    assert func.has_dual_form(m)


def test_checkpointed_dit_falls_back_with_equal_results():
    m = _randomise(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8), std=0.2).double()
    plain = func.jvp(func.bind(m, y=None), *_dit_args(4))
    fk.apply_activation_checkpointing(m, "blocks")
    assert not func.has_dual_form(m)
    ck = func.jvp(func.bind(m, y=None), *_dit_args(4))
    assert max(rel_err(a, b) for a, b in zip(ck, plain)) < 1e-12


def _dit_args(n):
    x = _randn(2, 1, n, n, seed=1)
    s, t = torch.full((2,), 0.7, dtype=D), torch.full((2,), 0.2, dtype=D)
    return (x, s, t), (_randn(2, 1, n, n, seed=2), torch.ones(2, dtype=D), torch.zeros(2, dtype=D))


class _Sin(torch.nn.Module):
    """A module whose dual form is deliberately wrong (zero tangent), to see which path ran."""

    def forward(self, x):
        return x.sin()

    def forward_jvp(self, x, tx):
        return x.sin(), torch.zeros_like(x)


def test_nested_in_forward_mode_uses_torch_func_jvp():
    """Inside an outer forward-mode level (the explicit ops have no jvp rule) torch.func.jvp runs."""
    m = _Sin()
    x, tx, u = _randn(2, 4, seed=0), _randn(2, 4, seed=1), _randn(2, 4, seed=2)
    assert torch.equal(func.jvp(m, (x,), (tx,))[1], torch.zeros_like(x))  # top level: the dual form
    _, got = torch.func.jvp(lambda a: func.jvp(m, (a,), (tx,))[1], (x,), (u,))
    assert rel_err(got, -x.sin() * tx * u) < 1e-13  # d/dx (cos x tx) along u
    with fwAD.dual_level():
        assert not func.has_dual_form(m)


def test_argument_errors():
    m = Linear(4, 3).double()
    x = _randn(2, 4, seed=0)
    with pytest.raises(ValueError, match="tangents: expected 1"):
        func.jvp(m, (x,), (x, x))
    with pytest.raises(ValueError, match="tangents: entry 0 has shape"):
        func.jvp(m, (x,), (x[:1],))
    with pytest.raises(ValueError, match="tangents: entry 0 has dtype"):
        func.jvp(m, (x,), (x.float(),))
    with pytest.raises(TypeError, match="primals"):
        func.jvp(m, 3, (x,))
    with pytest.raises(TypeError, match="model"):
        func.bind(3)
    dit = DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8).double()
    (xx, s, t), (tx, ts, tt) = _dit_args(4)
    with pytest.raises(ValueError, match="ts: expected"):
        dit.forward_jvp(xx, s, t, tx, ts[:1], tt)


def test_methods_take_their_jvp_through_the_dual_form(monkeypatch):
    """meanflow / tvm / scm call DiT.forward_jvp; their losses and gradients equal the torch.func.jvp path."""
    from flowmap_kernels.methods import meanflow, scm, tvm
    m = _randomise(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8), std=0.2).double()
    m = scm.prepare_model(m)
    params = list(m.parameters())
    x0, y = _randn(2, 1, 4, 4, seed=0), torch.tensor([1, 2])
    orig = DiT.forward_jvp

    def run(method):
        torch.manual_seed(0)
        lo, _ = method.loss(m, x0, cond=y)
        return [lo] + list(torch.autograd.grad(lo, params, allow_unused=True))

    calls = []

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    for method in (meanflow, tvm, scm):
        monkeypatch.setattr(DiT, "forward_jvp", counting)
        got = run(method)
        monkeypatch.setattr(func, "dual_form", lambda f: None)  # force torch.func.jvp
        want = run(method)
        monkeypatch.undo()
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                assert rel_err(a, b) < 1e-10, (method.NAME, rel_err(a, b))
    assert len(calls) == 3


@pytest.mark.parametrize("dual", [True, False], ids=["dual_form", "torch_func_jvp"])
def test_tangent_grad_false_detaches_and_runs_the_primal_backward(dual, monkeypatch):
    """jvp(..., tangent_grad=False): the same (y, ty) with ty detached; gradients of a loss on y equal those
    with the tangent kept; in the dual form no fused op runs a backward through the tangent."""
    m = _randomise(DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, freq_dim=8,
                       qk_norm=True), std=0.2).double()
    (x, s, t), (tx, ts, tt) = _dit_args(4)
    f = func.bind(m, y=torch.tensor([1, 2]))
    if not dual:
        monkeypatch.setattr(func, "dual_form", lambda f: None)
    params = list(m.parameters())
    y1, ty1 = func.jvp(f, (x, s, t), (tx, ts, tt))
    g1 = torch.autograd.grad((y1 ** 2).sum() + (y1 * ty1.detach()).sum(), params)
    seen = []
    if dual:  # which custom ops the backward runs
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, op, types, args=(), kwargs=None):
                seen.append(str(op))
                return op(*args, **(kwargs or {}))
    y2, ty2 = func.jvp(f, (x, s, t), (tx, ts, tt), tangent_grad=False)
    assert not ty2.requires_grad and y2.requires_grad
    assert rel_err(y2, y1) == 0 and rel_err(ty2, ty1) == 0
    loss = (y2 ** 2).sum() + (y2 * ty2).sum()
    if dual:
        with Ops():
            g2 = torch.autograd.grad(loss, params)
        fused = [o for o in seen if o.startswith("flowmap_kernels.")]
        assert any("attention_backward" in o for o in fused) and any("norm_backward" in o for o in fused), fused
        assert not [o for o in fused if "jvp_backward" in o], fused
    else:
        g2 = torch.autograd.grad(loss, params)
    for a, b in zip(g2, g1):
        assert rel_err(a, b) < 1e-12
    # the switch is per call: the next JVP's tangent is differentiable again, also after an error
    assert func.jvp(f, (x, s, t), (tx, ts, tt))[1].requires_grad
    if dual:
        def boom(self, *a, **k):
            raise RuntimeError("boom")
        monkeypatch.setattr(DiT, "forward_jvp", boom)
        with pytest.raises(RuntimeError, match="boom"):
            func.jvp(f, (x, s, t), (tx, ts, tt), tangent_grad=False)
        monkeypatch.undo()
    assert func.jvp(f, (x, s, t), (tx, ts, tt))[1].requires_grad
    with pytest.raises(TypeError, match="tangent_grad: expected a bool"):
        func.jvp(f, (x, s, t), (tx, ts, tt), tangent_grad=None)


@pytest.mark.parametrize("out", ["tensor", "tuple", "list", "dict"])
def test_tangent_grad_false_with_any_output_structure(out):
    """torch.func.jvp returns f's output structure; tangent_grad=False detaches every tensor in it (a list or
    dict output raised AttributeError: no attribute 'detach') and keeps the structure and values."""
    x, tx = _randn(3, 4, seed=1).requires_grad_(), _randn(3, 4, seed=2)

    def f(a):
        y1, y2 = a.sin(), a * a
        return {"tensor": y1, "tuple": (y1, y2), "list": [y1, [y2]], "dict": {"a": y1, "b": (y2,)}}[out]

    y, ty = func.jvp(f, (x,), (tx,), tangent_grad=False)
    want_y, want_ty = torch.func.jvp(f, (x,), (tx,))
    got, want = torch.utils._pytree.tree_flatten(ty), torch.utils._pytree.tree_flatten(want_ty)
    assert got[1] == want[1] and torch.utils._pytree.tree_structure(y) == want[1]
    assert all(not t.requires_grad and torch.equal(t, w) for t, w in zip(got[0], want[0]))
    assert all(t.requires_grad for t in torch.utils._pytree.tree_leaves(y))


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_float32_tangents_through_a_bfloat16_dit(backend):
    """tangent_dtype=torch.float32 on a bfloat16 DiT (QK-norm, labels): the JVP comes back in float32, never
    rounded to 16 bits; against the float64 model at the same bfloat16 weights and inputs it is more accurate
    than the bfloat16 JVP (what is left is the 16-bit primal's rounding, which the option keeps), the primal
    output is unchanged in kind (bfloat16, same accuracy), and the backward through the float32 JVP reaches
    every parameter."""
    m = _randomise(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                       num_classes=10, qk_norm=True), std=0.08, seed=3).bfloat16()
    ref = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10,
              qk_norm=True).double()
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    B = 4
    x, tx = (torch.randn(B, 1, 8, 8, generator=g).bfloat16() for _ in range(2))
    s, t, ts, tt = (torch.rand(B, generator=g).bfloat16() for _ in range(4))
    y = torch.randint(0, 10, (B,), generator=g)
    with fk.use_backend("torch"):
        ro, rto = func.jvp(func.bind(ref, y=y), (x.double(), s.double(), t.double()),
                           (tx.double(), ts.double(), tt.double()))
    f = func.bind(m, y=y)
    with fk.use_backend(backend):
        o16, to16 = func.jvp(f, (x, s, t), (tx, ts, tt))
        o32, to32 = func.jvp(f, (x, s, t), (tx, ts, tt), tangent_dtype=torch.float32)
        # float32 tangents may also be given as such
        o32b, to32b = func.jvp(f, (x, s, t), (tx.float(), ts.float(), tt.float()), tangent_dtype=torch.float32)
        assert torch.equal(to32, to32b) and torch.equal(o32, o32b)
        assert o32.dtype == torch.bfloat16 and to32.dtype == torch.float32 and to16.dtype == torch.bfloat16
        e16, e32 = rel_err(to16, rto), rel_err(to32, rto)
        print(f"\n{backend}: tV error against float64: {e16:.2e} (bfloat16 tangents), {e32:.2e} (float32)")
        assert e32 < 0.9 * e16, (e32, e16)
        assert rel_err(o32, ro) < 1.5 * rel_err(o16, ro) + 1e-3
        loss = (to32.double() ** 2).sum() + o32.double().sum()
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    assert all(gr is not None and gr.dtype == torch.bfloat16 and torch.isfinite(gr).all() for gr in grads)


def test_float32_tangent_errors():
    m = Linear(4, 3).bfloat16()
    x = torch.randn(2, 4).bfloat16()
    with pytest.raises(ValueError, match=r"tangents: entry 0 has dtype torch.float32, its primal torch.bfloat16 "
                                         r"\(float32 tangents of 16-bit primals: tangent_dtype=torch.float32\)"):
        func.jvp(m, (x,), (x.float(),))
    with pytest.raises(ValueError, match="tangent_dtype: expected None"):
        func.jvp(m, (x,), (x,), tangent_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a model with a dual form"):
        func.jvp(lambda z: z * 2, (x,), (x,), tangent_dtype=torch.float32)
    y, ty = func.jvp(m, (x,), (x,), tangent_dtype=torch.float32)
    assert y.dtype == torch.bfloat16 and ty.dtype == torch.float32
