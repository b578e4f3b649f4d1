"""flowmap_kernels.checkpoint / apply_activation_checkpointing against the same computation without
checkpointing, float64: gradients of the parameters, inputs and tangents agree to 1e-12 under
torch.func.jvp and torch.autograd.forward_ad, for the flow-map methods' J (no backward), JB (backward
through the primal) and JBJ (backward through the tangent) patterns on the package DiT; RNG-using blocks;
nested outputs, non-tensor and keyword arguments, partial requires_grad; plain reverse mode; selective
checkpointing counted in attention-kernel calls; memory kept by the forward; FSDP2 and context
parallelism with two processes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import flowmap_kernels as fk
from flowmap_kernels.activation_checkpoint import ATTENTION_OPS, CheckpointedForward
from flowmap_kernels.methods import get_method
from flowmap_kernels.nn import DiT
from tests.numerics import rel_err
from tests.reference import random_parameters_

TOL = 5e-13  # tests.numerics.rel_err, float64 paths that differ only in summation order (measured <= 2.2e-15)
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _rel(a, b):
    if a is None or b is None:
        assert a is None and b is None
        return 0.0
    return rel_err(a, b)


def _max_rel(ga, gb):
    assert len(ga) == len(gb)
    return max(_rel(a, b) for a, b in zip(ga, gb))


def _dit(seed=0, mode="none", depth=2, **kw):
    torch.manual_seed(seed)
    cfg = dict(input_size=6, patch_size=2, in_channels=1, hidden_size=16, depth=depth, num_heads=2,
               num_classes=0, freq_dim=8)
    cfg.update(kw)
    m = DiT(**cfg).to(F64)
    return fk.apply_activation_checkpointing(random_parameters_(m, seed + 100, 0.2), mode)


class _CountOps(TorchDispatchMode):
    """Counts calls of the package attention custom ops (forward, backward, forward+JVP, its backward)."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "flowmap_kernels":
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------------
# method losses on the DiT: J, JB, JBJ


METHOD_CASES = [("meanflow", {}), ("scm", {}), ("tvm", {}), ("esd", {}), ("esd", {"spatial_sg": False})]


def _method_grads(method, cfg, mode):
    model = _dit(mode=mode)
    prepare = getattr(get_method(method), "prepare_model", None)
    if prepare is not None:  # e.g. sCM's adaptive time weighting module
        torch.manual_seed(11)
        model = prepare(model, cfg).to(F64)
    x0 = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    loss, _ = get_method(method).loss(model, x0, generator=torch.Generator().manual_seed(7), **cfg)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


@pytest.mark.parametrize("method,cfg", METHOD_CASES, ids=[m + ("-nosg" if c else "") for m, c in METHOD_CASES])
@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_method_loss_gradients_equal_without_checkpointing(method, cfg, mode):
    """meanflow / scm: J + B through the primal; tvm / esd: J + BJ (esd also a J under no_grad)."""
    loss0, g0 = _method_grads(method, cfg, "none")
    loss1, g1 = _method_grads(method, cfg, mode)
    assert _rel(loss1, loss0) < TOL
    assert all(g is not None for g in g0)
    assert _max_rel(g1, g0) < TOL


def _jvp_dit(model, how, x, s, t, tx, ts, tt):
    if how == "func":
        return torch.func.jvp(lambda a, b, c: model(a, b, c), (x, s, t), (tx, ts, tt))
    with fwAD.dual_level():
        out = model(fwAD.make_dual(x, tx), fwAD.make_dual(s, ts), fwAD.make_dual(t, tt))
        y, ty = fwAD.unpack_dual(out)
    return y, ty


@pytest.mark.parametrize("how", ["func", "forward_ad"])
@pytest.mark.parametrize("mode", ["blocks", "selective"])
def test_dit_gradients_of_inputs_tangents_and_parameters(how, mode):
    """d/d(x, s, t, tx, ts, tt, theta) of a loss on (V, dV): reverse-over-forward through every block."""
    g = torch.Generator().manual_seed(3)
    prim = [torch.randn(2, 1, 6, 6, generator=g, dtype=F64), torch.rand(2, generator=g, dtype=F64),
            torch.rand(2, generator=g, dtype=F64)]
    tang = [torch.randn_like(p) for p in prim]
    results = []
    for m in ("none", mode):
        model = _dit(mode=m)
        xs = [p.clone().requires_grad_() for p in prim + tang]
        y, ty = _jvp_dit(model, how, *xs)
        loss = y.sin().sum() + (ty ** 2).sum() + (y * ty).sum()
        results.append(torch.autograd.grad(loss, xs + list(model.parameters())))
    assert _max_rel(results[1], results[0]) < TOL


def test_dit_constructor_checkpoint_blocks():
    model = _dit()
    assert all(not isinstance(b.__dict__.get("forward"), CheckpointedForward) for b in model.blocks)
    for arg, policy in ((True, None), ("blocks", None), ("selective", "attention"),
                        ([torch.ops.flowmap_kernels.attention_jvp_forward], None)):
        m = DiT(input_size=4, hidden_size=8, depth=2, num_heads=2, checkpoint_blocks=arg)
        fwds = [b.__dict__.get("forward") for b in m.blocks]
        assert all(isinstance(f, CheckpointedForward) for f in fwds)
        assert fwds[0].policy == (policy if policy is not None or not isinstance(arg, list) else arg)
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        DiT(input_size=4, hidden_size=8, depth=1, num_heads=2, checkpoint_blocks="everything")


def test_apply_none_undoes_and_state_dict_unchanged():
    model = _dit()
    keys = list(model.state_dict())
    fk.apply_activation_checkpointing(model, "blocks")
    assert list(model.state_dict()) == keys
    assert all("forward" in b.__dict__ for b in model.blocks)
    copy_ = copy.deepcopy(model)  # e.g. an EMA copy: its wrappers call the copy's blocks
    assert all(cb.forward.forward.__self__ is cb for cb in copy_.blocks)
    fk.apply_activation_checkpointing(model, "none")
    assert all("forward" not in b.__dict__ for b in model.blocks)


# ------------------------------------------------------------------------------------------------------
# recomputation: attention kernel calls, activation memory kept by the forward


def _tvm_counts(mode):
    model = _dit(mode=mode, depth=3)
    x0 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=F64)
    with _CountOps() as c:
        loss, _ = get_method("tvm").loss(model, x0, generator=torch.Generator().manual_seed(7))
        loss.backward()
    return c.counts


def test_selective_checkpointing_does_not_recompute_attention():
    """TVM: one J (3 blocks -> 3 attention_jvp_forward) with a backward through it, two plain forwards
    (3 attention_forward each, one of them with a backward). 'blocks' recomputes the J's attention
    (3 more jvp forwards) and the trained plain forward's (3 more forwards); 'selective' none."""
    none, blocks, selective = _tvm_counts("none"), _tvm_counts("blocks"), _tvm_counts("selective")
    assert none["attention_jvp_forward"] == 3 and none["attention_forward"] == 6
    assert blocks["attention_jvp_forward"] == 6 and blocks["attention_forward"] == 9
    assert selective["attention_jvp_forward"] == 3 and selective["attention_forward"] == 6
    for k in ("attention_jvp_backward", "attention_backward"):
        assert none[k] == blocks[k] == selective[k] == 3


def _saved_bytes_of_jvp(model, how):
    """Bytes autograd keeps from a JVP of ``model`` (saved-tensor hooks see every saved activation)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    x = torch.randn(2, 1, 6, 6, dtype=F64)
    s, t = torch.rand(2, dtype=F64), torch.rand(2, dtype=F64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _jvp_dit(model, how, x, s, t, torch.zeros_like(x), torch.zeros_like(s), torch.ones_like(t))
    return total[0]


def _saved_bytes(mode, how):
    """Bytes autograd keeps from a JVP of the DiT checkpointed with ``mode``."""
    return _saved_bytes_of_jvp(_dit(mode=mode, depth=4, hidden_size=32), how)


@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_forward_keeps_only_block_inputs(how):
    """With 'blocks' the JVP's forward saves per block only (h, c) and their tangents; measured against
    the saves of the same JVP without checkpointing (per block: norms, qkv, attention, MLP...)."""
    none, blocks = _saved_bytes("none", how), _saved_bytes("blocks", how)
    model = _dit(depth=4, hidden_size=32)
    per_block_inputs = 2 * (2 * 9 * 32 + 2 * 32) * 8  # (h (2, 9, 32), c (2, 32)) and tangents, float64
    outside = _saved_bytes_outside_blocks(model, how)
    assert blocks - outside <= 4 * per_block_inputs
    assert none - outside > 5 * (blocks - outside)


def _saved_bytes_outside_blocks(model, how):
    """Saves of the same JVP with the blocks replaced by the identity (embeddings and final layer)."""
    for b in model.blocks:
        b.forward = lambda h, c: h
    return _saved_bytes_of_jvp(model, how)


def test_recomputation_uses_the_forward_backend():
    """Forward under use_backend("naive") (math attention, no custom op), backward outside it: the
    recomputation must run the naive attention too (no flowmap_kernels op at all), same gradients."""
    x = torch.randn(2, 1, 6, 6, dtype=F64)
    s, t = torch.rand(2, dtype=F64), torch.rand(2, dtype=F64)
    grads = []
    for mode in ("none", "blocks"):
        model = _dit(mode=mode)
        with _CountOps() as c:
            with fk.use_backend("naive"):
                y, ty = _jvp_dit(model, "func", x, s, t, torch.zeros_like(x), torch.zeros_like(s), torch.ones_like(t))
            grads.append(torch.autograd.grad((ty ** 2).sum() + y.sum(), list(model.parameters())))
        assert not any(k.startswith("attention") for k in c.counts), c.counts
    assert _max_rel(grads[1], grads[0]) < TOL


def test_diffusers_transformer_blocks():
    """A diffusers DiT (as a flow map, fk.attention processors), TVM loss: gradients equal with and
    without checkpointing its transformer_blocks; selective does not recompute attention."""
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from diffusers import DiTTransformer2DModel

    from flowmap_kernels.integrations.diffusers import (DiffusersFlowMap, checkpoint_transformer_blocks,
                                                        set_flowmap_attention)

    def grads(mode):
        torch.manual_seed(0)
        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=2,
                                    num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=3).to(F64)
        fm = DiffusersFlowMap(dit)
        set_flowmap_attention(random_parameters_(fm, 1, 0.2))
        if mode != "none":
            assert checkpoint_transformer_blocks(fm, mode) == 2
        x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
        with _CountOps() as c:
            loss, _ = get_method("tvm").loss(fm, x0, cond=torch.tensor([0, 2]),
                                             generator=torch.Generator().manual_seed(7))
            out = torch.autograd.grad(loss, [p for p in fm.parameters() if p.requires_grad], allow_unused=True)
        return out, c.counts

    (g0, c0), (g1, c1), (g2, c2) = grads("none"), grads("blocks"), grads("selective")
    assert _max_rel(g1, g0) < TOL and _max_rel(g2, g0) < TOL
    assert c1["attention_jvp_forward"] == 2 * c0["attention_jvp_forward"] == 4
    assert c2["attention_jvp_forward"] == 2 and c2["attention_forward"] == c0["attention_forward"]
    with pytest.raises(ValueError, match="transformer_blocks"):
        checkpoint_transformer_blocks(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------------
# the checkpoint contract on small functions


class DropoutBlock(nn.Module):
    """x + W2 dropout(tanh(W1 x)): draws from the RNG in the forward."""

    def __init__(self, dim=6, p=0.4):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Dropout(p)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _jvp_grads(fn, params, primals, tangents, how, seed=0):
    xs = [p.clone().requires_grad_() for p in primals]
    ts = [t.clone().requires_grad_() for t in tangents]
    torch.manual_seed(seed)
    if how == "func":
        y, ty = torch.func.jvp(fn, tuple(xs), tuple(ts))
    else:
        with fwAD.dual_level():
            y, ty = fwAD.unpack_dual(fn(*[fwAD.make_dual(a, b) for a, b in zip(xs, ts)]))
    loss = (y.cos() * y).sum() + (ty ** 3).sum()
    return [y.detach(), ty.detach()] + list(torch.autograd.grad(loss, xs + ts + list(params)))


@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_rng_state_restored_for_the_recomputation(how):
    torch.manual_seed(0)
    block = DropoutBlock().to(F64)
    x = torch.randn(4, 6, dtype=F64)
    tx = torch.randn_like(x)
    ref = _jvp_grads(block, block.parameters(), (x,), (tx,), how)
    got = _jvp_grads(lambda a: fk.checkpoint(block, a), block.parameters(), (x,), (tx,), how)
    assert _max_rel(got, ref) < TOL
    # the same call without restoring the RNG recomputes with other dropout masks: gradients differ
    bad = _jvp_grads(lambda a: fk.checkpoint(block, a, preserve_rng_state=False), block.parameters(), (x,), (tx,), how)
    assert _max_rel(bad[:2], ref[:2]) < TOL and _max_rel(bad[2:], ref[2:]) > 1e-3


@pytest.mark.parametrize("preserve_rng_state", [True, False])
@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_autocast_state_restored_for_the_recomputation(how, preserve_rng_state):
    """Under torch.autocast the recomputation (run by loss.backward outside the autocast region) casts as the
    forward did, also with preserve_rng_state=False (it used to recompute in float32 then: bfloat16 gradients
    off by 4e-3). Same ops in the same dtypes as without checkpointing: equal results."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
    x, tx = torch.randn(4, 8), torch.randn(4, 8)

    def run(use_ck):
        xs, ts = x.clone().requires_grad_(), tx.clone().requires_grad_()
        fn = (lambda a: fk.checkpoint(block, a, preserve_rng_state=preserve_rng_state)) if use_ck else block
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if how == "func":
                y, ty = torch.func.jvp(fn, (xs,), (ts,))
            else:
                with fwAD.dual_level():
                    y, ty = fwAD.unpack_dual(fn(fwAD.make_dual(xs, ts)))
        assert y.dtype == ty.dtype == torch.bfloat16
        loss = (y.float() ** 2).sum() + (ty.float() ** 3).sum()
        return [y, ty] + list(torch.autograd.grad(loss, [xs, ts] + list(block.parameters())))

    assert _max_rel(run(True), run(False)) == 0


@pytest.mark.parametrize("input_tangent", [True, False])
def test_tangents_on_module_parameters_are_refused(input_tangent):
    """torch.func.jvp over functional_call's parameters through checkpointed blocks: the recomputation cannot
    see the parameters' tangents (the gradient of x came out wrong by 1.1, silently; with tangents on the
    parameters only PyTorch's checkpoint failed on metadata): NotImplementedError naming the parameter."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh()).to(F64)
    fk.apply_activation_checkpointing(model, blocks=[model[0]])
    params = {k: v.detach() for k, v in model.named_parameters()}
    tparams = {k: torch.randn_like(v) for k, v in params.items()}
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="its parameter 'weight' carries a forward-mode tangent"):
        if input_tangent:
            torch.func.jvp(lambda p, a: torch.func.functional_call(model, p, (a,)), (params, x),
                           (tparams, torch.randn_like(x)))
        else:
            torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (params,), (tparams,))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="its parameter 'weight'"):
        w = fwAD.make_dual(params["0.weight"], tparams["0.weight"])
        torch.func.functional_call(model, {"0.weight": w}, (fwAD.make_dual(x, torch.randn_like(x)),))


@pytest.mark.parametrize("where", ["checkpoint_compiled", "jvp_compiled"])
@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_inside_torch_compile(how, where):
    """fk.checkpoint in a torch.compile'd region, under forward mode (a torch.func.jvp outside or inside the
    region; the forward-mode path runs eagerly, a graph break: inside torch.func.jvp Dynamo used to fail with an
    internal functorch assertion), with dropout: equal to the uncompiled call without checkpointing."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    block = DropoutBlock().to(F64)
    x, tx = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    ref = _jvp_grads(block, block.parameters(), (x,), (tx,), how)
    if where == "checkpoint_compiled":
        got = _jvp_grads(torch.compile(lambda a: fk.checkpoint(block, a), backend="aot_eager"),
                         block.parameters(), (x,), (tx,), how)
    else:
        def step(a, ta):
            if how == "func":
                return torch.func.jvp(lambda z: fk.checkpoint(block, z), (a,), (ta,))
            with fwAD.dual_level():
                return tuple(fwAD.unpack_dual(fk.checkpoint(block, fwAD.make_dual(a, ta))))

        xs, ts = x.clone().requires_grad_(), tx.clone().requires_grad_()
        torch.manual_seed(0)
        y, ty = torch.compile(step, backend="aot_eager")(xs, ts)
        loss = (y.cos() * y).sum() + (ty ** 3).sum()
        got = [y.detach(), ty.detach()] + list(torch.autograd.grad(loss, [xs, ts] + list(block.parameters())))
    torch._dynamo.reset()
    assert _max_rel(got, ref) < TOL


@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_double_backward_is_refused(how):
    """create_graph=True through the forward-mode checkpoint: a NotImplementedError naming create_graph (it
    failed later with "element 0 of tensors does not require grad")."""
    lin = nn.Linear(4, 4).to(F64)
    x, tx = torch.randn(3, 4, dtype=F64, requires_grad=True), torch.randn(3, 4, dtype=F64)
    fn = lambda a: fk.checkpoint(lambda z: torch.tanh(lin(z)), a)  # noqa: E731
    if how == "func":
        y, ty = torch.func.jvp(fn, (x,), (tx,))
    else:
        with fwAD.dual_level():
            y, ty = fwAD.unpack_dual(fn(fwAD.make_dual(x, tx)))
    with pytest.raises(NotImplementedError, match="create_graph: double backward"):
        torch.autograd.grad((y ** 2).sum() + (ty ** 3).sum(), [x], create_graph=True)


@pytest.mark.parametrize("policy", [None, [torch.ops.aten.addmm]])
def test_reverse_mode_inside_torch_compile(policy):
    """Without tangents the call is PyTorch's checkpoint, which Dynamo traces (a selective policy included:
    its context_fn must be a function or functools.partial for Dynamo, a lambda failed)."""
    torch._dynamo.reset()
    torch.manual_seed(6)
    block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).to(F64)
    x = torch.randn(4, 6, dtype=F64)
    outs = []
    for fn in (block, torch.compile(lambda a: fk.checkpoint(block, a, policy=policy), backend="aot_eager")):
        xs = x.clone().requires_grad_()
        y = fn(xs)
        outs.append([y] + list(torch.autograd.grad((y ** 2).sum(), [xs] + list(block.parameters()))))
    torch._dynamo.reset()
    assert _max_rel(outs[1], outs[0]) < TOL


class Nested(nn.Module):
    """(x, pair, scale, activation name, kwargs) -> {"a": (y1, count), "b": [y2]}: nested outputs, a
    non-float output, non-tensor arguments."""

    def __init__(self, dim=5):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, pair, scale, act, *, bias=None):
        f = getattr(torch, act)
        u, w = pair
        y1 = f(self.lin(x)) * scale + u * w
        y2 = self.lin(y1 * w) if bias is None else self.lin(y1 * w) + bias
        return {"a": (y1, torch.tensor(3)), "b": [y2]}


@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_nested_outputs_non_tensor_args_kwargs_partial_grads(how):
    torch.manual_seed(1)
    mod = Nested().to(F64)
    x, u, w, bias = (torch.randn(3, 5, dtype=F64) for _ in range(4))
    tx, tu = torch.randn_like(x), torch.randn_like(u)

    def run(use_ck):
        xs = [x.clone().requires_grad_(), u.clone()]  # u needs no gradient, w and bias are constants
        ts = [tx.clone().requires_grad_(), tu.clone()]
        call = (lambda *a, **k: fk.checkpoint(mod, *a, **k)) if use_ck else mod

        def fn(a, b):
            out = call(a, (b, w), 0.7, "tanh", bias=bias)
            assert int(out["a"][1]) == 3
            return out["a"][0], out["b"][0]

        if how == "func":
            (y1, y2), (t1, t2) = torch.func.jvp(fn, tuple(xs), tuple(ts))
        else:
            with fwAD.dual_level():
                o1, o2 = fn(*[fwAD.make_dual(a, b) for a, b in zip(xs, ts)])
                (y1, t1), (y2, t2) = fwAD.unpack_dual(o1), fwAD.unpack_dual(o2)
        loss = (y1 * y2).sum() + (t1 * t2.exp()).sum() + y2.pow(2).sum()
        return [y1, y2, t1, t2] + list(torch.autograd.grad(loss, [xs[0], ts[0]] + list(mod.parameters())))

    assert _max_rel(run(True), run(False)) < TOL


def test_tangent_on_some_inputs_only_and_plain_function():
    """A plain function (its parameters found from the graph), tangent on the second input only."""
    torch.manual_seed(2)
    lin = nn.Linear(4, 4).to(F64)
    a, b, tb = (torch.randn(2, 4, dtype=F64, requires_grad=True) for _ in range(3))

    def f(x, y):
        return torch.tanh(lin(x)) * lin(y)

    def run(use_ck):
        fn = (lambda y: fk.checkpoint(f, a, y)) if use_ck else (lambda y: f(a, y))
        y, ty = torch.func.jvp(fn, (b,), (tb,))
        return torch.autograd.grad(y.sum() + (ty ** 2).sum(), [a, b, tb] + list(lin.parameters()))

    assert _max_rel(run(True), run(False)) < TOL


def test_closed_over_non_leaf_is_an_error():
    lin = nn.Linear(3, 3).to(F64)
    w = lin.weight * 2  # requires grad, not a leaf
    x, tx = torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="pass that tensor as an argument"):
        torch.func.jvp(lambda z: fk.checkpoint(lambda q: q @ w, z), (x,), (tx,))


def _block_with_condition(lin):
    return lambda x, c: torch.tanh(lin(x) * c)


@pytest.mark.parametrize("how", ["func", "forward_ad"])
def test_tangent_of_a_captured_tensor(how):
    """A condition c that carries a tangent: bound by functools.partial it counts as an argument (tangent
    output and gradients through it equal the call without checkpoint); captured by a closure it is an error
    naming it (the checkpoint differentiates along its arguments only: the tangent was silently dropped)."""
    import functools
    torch.manual_seed(6)
    lin = nn.Linear(4, 4).to(F64)
    block = _block_with_condition(lin)
    x, c, tx, tc = (torch.randn(3, 4, dtype=F64) for _ in range(4))
    ref = _jvp_grads(block, lin.parameters(), (x, c), (tx, tc), how)
    got = _jvp_grads(lambda a, b: fk.checkpoint(functools.partial(block, c=b), a), lin.parameters(), (x, c),
                     (tx, tc), how)
    assert _max_rel(got, ref) < TOL
    with pytest.raises(NotImplementedError, match="it captures 'b', a tensor carrying a forward-mode tangent"):
        _jvp_grads(lambda a, b: fk.checkpoint(lambda z: block(z, b), a), lin.parameters(), (x, c), (tx, tc), how)
    with fwAD.dual_level():  # a captured condition that needs no gradient: its tangent was dropped silently
        cond = fwAD.make_dual(c, tc)
        with pytest.raises(NotImplementedError, match="it captures 'cond'"):
            fk.checkpoint(lambda z: block(z, cond), fwAD.make_dual(x.clone().requires_grad_(), tx))


def test_plain_reverse_mode_matches_and_recomputes():
    torch.manual_seed(3)
    block = DropoutBlock().to(F64)
    calls = [0]

    def fn(x, scale):
        calls[0] += 1
        return block(x) * scale, x.sum()

    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    outs = []
    for use_ck in (False, True):
        torch.manual_seed(0)
        y, total = fk.checkpoint(fn, x, 1.5) if use_ck else fn(x, 1.5)
        outs.append([y] + list(torch.autograd.grad((y ** 2).sum() + total, [x] + list(block.parameters()))))
    assert _max_rel(outs[1], outs[0]) < TOL
    assert calls[0] == 3  # plain call, checkpointed forward, recomputation


def test_no_grad_runs_the_function_once():
    calls = [0]

    def fn(x):
        calls[0] += 1
        return x * 2

    x, tx = torch.randn(3, dtype=F64), torch.randn(3, dtype=F64)
    with torch.no_grad():
        y, ty = torch.func.jvp(lambda a: fk.checkpoint(fn, a), (x,), (tx,))
    assert calls[0] == 1 and torch.equal(ty, 2 * tx)


def test_identity_output_is_a_new_tensor():
    x = torch.randn(3, dtype=F64, requires_grad=True)
    tx = torch.randn(3, dtype=F64, requires_grad=True)
    y, ty = torch.func.jvp(lambda a: fk.checkpoint(lambda q: q, a), (x,), (tx,))
    gx, gtx = torch.autograd.grad((y * 3).sum() + (ty ** 2).sum(), [x, tx])
    assert torch.equal(gx, torch.full_like(x, 3.0)) and torch.equal(gtx, 2 * tx)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="function: expected a callable"):
        fk.checkpoint(3, x)
    with pytest.raises(TypeError, match="preserve_rng_state"):
        fk.checkpoint(torch.sin, x, preserve_rng_state="yes")
    with pytest.raises(TypeError, match="use_reentrant"):
        fk.checkpoint(torch.sin, x, use_reentrant=True)
    with pytest.raises(ValueError, match="policy"):
        fk.checkpoint(torch.sin, x, policy="mlp")
    with pytest.raises(TypeError, match="policy"):
        fk.checkpoint(torch.sin, x, policy=[torch.sin])
    model = _dit()
    with pytest.raises(ValueError, match="mode"):
        fk.apply_activation_checkpointing(model, "all")
    with pytest.raises(ValueError, match="blocks"):
        fk.apply_activation_checkpointing(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="blocks: entry 1"):
        fk.apply_activation_checkpointing(model, blocks=[model.blocks[0], "x"])
    with pytest.raises(TypeError, match="module"):
        fk.apply_activation_checkpointing([model.blocks[0]])
    with pytest.raises(ValueError, match="policy: only used"):
        fk.apply_activation_checkpointing(model, "blocks", policy=ATTENTION_OPS)
    with pytest.raises(NotImplementedError, match="torch.func transform"):  # jvp inside torch.func.grad
        torch.func.grad(lambda a: torch.func.jvp(lambda q: fk.checkpoint(torch.sin, q), (a,), (a,))[1].sum())(x)


# ------------------------------------------------------------------------------------------------------
# FSDP2: two gloo processes, the checkpoint inside each fully_shard(block)


def _fsdp_worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for mode in ("none", "blocks", "selective"):
        model = _dit(mode=mode, depth=2)
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        x0 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5 + rank), dtype=F64)
        loss, _ = get_method("tvm").loss(model, x0, generator=torch.Generator().manual_seed(7 + rank))
        loss.backward()
        out[mode] = [p.grad.full_tensor() for p in model.parameters()]
    return out


def test_fsdp2_two_processes_gradients_equal(tmp_path):
    """TVM loss (backward through the JVP) on a DiT with every block fully_shard-ed over 2 gloo ranks:
    the gradients with block / selective checkpointing equal those without, and equal the single-process
    gradient of the mean of the two ranks' losses."""
    from tests.distributed.harness import spawn

    out = spawn(_fsdp_worker, 2, tmp_path)
    ref = out["none"]
    for mode in ("blocks", "selective"):
        assert _max_rel(out[mode], ref) < TOL
    model = _dit()
    losses = []
    for rank in range(2):
        x0 = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(5 + rank), dtype=F64)
        losses.append(get_method("tvm").loss(model, x0, generator=torch.Generator().manual_seed(7 + rank))[0])
    single = torch.autograd.grad(sum(losses) / 2, list(model.parameters()))
    assert _max_rel(ref, single) < 5e-11  # norm ratio (measured 5.1e-16; was 1e-10 on the max ratio)


# ------------------------------------------------------------------------------------------------------
# context parallelism (flowmap_kernels.distributed): the recomputation re-runs the sharded attention


def _cp_worker(rank, world):
    from flowmap_kernels.distributed import context_parallel

    out = {}
    for cp_mode in ("ring", "ulysses"):
        for mode in ("none", "blocks", "selective"):
            model = _dit(mode=mode, input_size=8)
            x0 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
            with context_parallel(model, mode=cp_mode):
                loss, _ = get_method("tvm").loss(model, x0, generator=torch.Generator().manual_seed(7))
                grads = torch.autograd.grad(loss, list(model.parameters()))
            out[cp_mode, mode] = (loss.detach(), grads)
    return out


def test_context_parallel_two_processes_gradients_equal(tmp_path):
    """TVM loss on a DiT whose 16 tokens are sharded over 2 gloo ranks (ring and Ulysses attention):
    block / selective checkpointing give the gradients of no checkpointing (rank 0)."""
    pytest.importorskip("flowmap_kernels.distributed")
    from tests.distributed.harness import spawn

    out = spawn(_cp_worker, 2, tmp_path)
    for cp_mode in ("ring", "ulysses"):
        loss0, g0 = out[cp_mode, "none"]
        for mode in ("blocks", "selective"):
            loss1, g1 = out[cp_mode, mode]
            assert _rel(loss1, loss0) < TOL
            assert _max_rel(g1, g0) < TOL, (cp_mode, mode)
