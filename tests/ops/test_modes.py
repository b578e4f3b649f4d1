"""Autograd modes, dispatch, bad input and FLOP counts of the DiT primitives."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flowmap_kernels.ops as ops
from flowmap_kernels import use_backend
from flowmap_kernels.backends import BackendUnavailableError
from flowmap_kernels.ops import kernels
from tests.numerics import TOLERANCE, rel_err
from tests.ops.helpers import (make_inputs, ref_gated_residual, ref_gelu_tanh, ref_layer_norm, ref_linear,
                               ref_modulated_layer_norm, ref_rms_norm)
from tests.reference import jvp_of_jvp

F64 = torch.float64


def _gc_cases():
    """(name, fn, primal shapes) for gradcheck in float64 on tiny shapes."""
    return [
        ("mln", ops.modulated_layer_norm, [(2, 3, 5), (2, 1, 5), (2, 1, 5)]),
        ("mln_expand", ops.modulated_layer_norm, [(2, 3, 5), (1, 3, 5), (5,)]),
        ("ln", ops.layer_norm, [(2, 3, 6), (6,), (6,)]),
        ("rms", ops.rms_norm, [(2, 3, 6), (6,)]),
        ("gelu", ops.gelu_tanh, [(3, 4), (4,)]),
        ("gated", ops.gated_residual, [(2, 3, 4), (2, 1, 4), (2, 3, 4)]),
        ("linear", ops.linear, [(2, 3, 4), (5, 4), (5,)]),
    ]


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("case", _gc_cases(), ids=lambda c: c[0])
def test_gradcheck_primal_and_tangent(case, backend):
    """gradcheck of the primal and of the tangent through torch.func.jvp (all primals and tangents)."""
    _, fn, shapes = case
    if backend == "extension" and case[0] != "linear":
        # float64 never runs in the kernels: gradcheck the float64 "torch" path (same formulas) instead
        backend = "torch"
    prim, tang = make_inputs(shapes, F64, seed=5)
    xs = [p.requires_grad_() for p in prim] + [t.requires_grad_() for t in tang]
    n = len(prim)
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *a: fn(*a), xs[:n])
        assert torch.autograd.gradcheck(lambda *a: torch.func.jvp(fn, tuple(a[:n]), tuple(a[n:]))[1], xs)


def test_double_backward_of_the_primal_is_differentiable():
    prim, _ = make_inputs([(2, 3, 5), (2, 1, 5), (2, 1, 5)], F64, seed=2)
    xs = [p.requires_grad_() for p in prim]
    with use_backend("torch"):
        assert torch.autograd.gradgradcheck(ops.modulated_layer_norm, xs)
        assert torch.autograd.gradgradcheck(lambda x, b: ops.gelu_tanh(x, b),
                                            xs[:1] + [prim[1][0, 0].detach().requires_grad_()])


@pytest.mark.parametrize("case", _gc_cases(), ids=lambda c: c[0])
def test_second_order_through_the_fused_backward(case):
    """The backward passes are differentiable the way attention's are (fused first order, naive recomputation
    only for a second derivative): gradgradcheck through the tangent, forward-over-reverse (torch.func.jvp of
    torch.func.grad) against the naive backend, and create_graph=True gives the first-order gradients of the
    fused kernels bit for bit."""
    _, fn, shapes = case
    prim, tang = make_inputs(shapes, F64, seed=7)
    n = len(prim)
    xs = [p.clone().requires_grad_() for p in prim] + [t.clone().requires_grad_() for t in tang]

    def loss_grad(x):
        return torch.func.grad(lambda a: (fn(a, *prim[1:]) ** 3).sum())(x)

    with use_backend("torch"):
        assert torch.autograd.gradgradcheck(lambda *a: torch.func.jvp(fn, tuple(a[:n]), tuple(a[n:]))[1], xs)
        _, hv = torch.func.jvp(loss_grad, (prim[0],), (tang[0],))
        plain = torch.autograd.grad((fn(*xs[:n]) ** 2).sum(), xs[:n])
        graph = torch.autograd.grad((fn(*xs[:n]) ** 2).sum(), xs[:n], create_graph=True)
    with use_backend("naive"):
        _, hv_ref = torch.func.jvp(loss_grad, (prim[0],), (tang[0],))
    assert rel_err(hv, hv_ref) <= TOLERANCE[F64]
    assert all(torch.equal(a, b.detach()) for a, b in zip(plain, graph))


_REFS = {"mln": ref_modulated_layer_norm, "mln_expand": ref_modulated_layer_norm, "ln": ref_layer_norm,
         "rms": ref_rms_norm,
         "gelu": ref_gelu_tanh, "gated": ref_gated_residual, "linear": ref_linear}
_EXPLICIT = {"mln": ops.modulated_layer_norm_jvp, "mln_expand": ops.modulated_layer_norm_jvp,
             "ln": ops.layer_norm_jvp, "rms": ops.rms_norm_jvp, "gelu": ops.gelu_tanh_jvp,
             "gated": ops.gated_residual_jvp, "linear": ops.linear_jvp}


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("case", _gc_cases(), ids=lambda c: c[0])
def test_jvp_of_jvp(case, backend):
    """Forward-over-forward (a JVP of the JVP: nested torch.func.jvp, and forward_ad over the explicit *_jvp
    form) against the nested float64 reference; float32 (the extension's kernels) and float64."""
    import torch.autograd.forward_ad as fwAD
    name, fn, shapes = case
    dtype = torch.float32 if backend == "extension" else F64
    prim, inner = make_inputs(shapes, dtype, seed=13)
    _, outer = make_inputs(shapes, dtype, seed=14)
    (ry, rty), (rdy, rdty) = jvp_of_jvp(_REFS[name], *(tuple(x.double() for x in xs) for xs in (prim, inner, outer)))
    tol = TOLERANCE[dtype]
    with use_backend(backend):
        (y, ty), (dy, dty) = jvp_of_jvp(fn, prim, inner, outer)
        with fwAD.dual_level():
            outs = _EXPLICIT[name](*(fwAD.make_dual(p, u) for p, u in zip(prim, outer)), *inner)
            (y2, dy2), (ty2, dty2) = (tuple(fwAD.unpack_dual(o)) for o in outs)
    for got, want in ((y, ry), (ty, rty), (dy, rdy), (dty, rdty), (y2, ry), (ty2, rty), (dy2, rdy), (dty2, rdty)):
        assert got.dtype == dtype and rel_err(got, want) <= tol, name


def test_func_grad_over_func_jvp():
    prim, tang = make_inputs([(2, 3, 7), (2, 1, 7), (2, 1, 7)], F64, seed=3)

    def loss(x, fn):
        _, ty = torch.func.jvp(lambda a: fn(a, prim[1], prim[2]), (x,), (tang[0],))
        return (ty ** 2).sum()

    with use_backend("torch"):
        ours = torch.func.grad(loss)(prim[0], ops.modulated_layer_norm)
    ref = torch.func.grad(loss)(prim[0], ref_modulated_layer_norm)
    assert rel_err(ours, ref) < TOLERANCE[torch.float64]


def test_forward_ad_dual_tensors():
    prim, tang = make_inputs([(2, 4, 72), (72,)], torch.float32, seed=9)
    import torch.autograd.forward_ad as fwAD
    with use_backend("extension"), fwAD.dual_level():
        y = ops.rms_norm(fwAD.make_dual(prim[0], tang[0]), prim[1])
        _, ty = fwAD.unpack_dual(y)
    _, ty_ref = torch.func.jvp(lambda x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * prim[1],
                               (prim[0].double(),), (tang[0].double(),))
    assert rel_err(ty, ty_ref) < TOLERANCE[torch.float32]


def test_extension_is_built_and_used_under_auto(monkeypatch):
    info = ops.extension_info()
    assert info["cpu_extension"] is True
    assert set(info) == {"cpu_extension", "cuda_extension_built", "cuda_archs", "cuda_image_for_device"}
    x = torch.randn(4, 8, 72)
    shift, scale = torch.randn(4, 1, 72), torch.randn(4, 1, 72)
    with use_backend("auto"):
        for name in ("modulated_layer_norm", "layer_norm", "rms_norm", "gelu_tanh", "gated_residual"):
            assert ops.resolve_backend(name, x) == "extension"
        calls = []
        from flowmap_kernels.ops import extension
        real = extension.cpu_module()
        monkeypatch.setattr(extension, "cpu_module", lambda: calls.append(1) or real)
        torch.func.jvp(lambda a: ops.modulated_layer_norm(a, shift, scale), (x,), (torch.randn_like(x),))
        assert calls, "the CPU extension was not called under 'auto'"


def test_mean_flow_style_detached_tangent_skips_the_jvp_backward(monkeypatch):
    """Only the primal is differentiated: the backward through the JVP must not run."""
    calls = {"jvp_backward": 0}
    real = kernels.norm_jvp_backward

    def spy(*a):
        calls["jvp_backward"] += 1
        return real(*a)

    monkeypatch.setattr(kernels, "norm_jvp_backward", spy)
    x = torch.randn(2, 3, 37, requires_grad=True)
    w = torch.randn(37, requires_grad=True)
    with use_backend("extension"):
        y, ty = torch.func.jvp(lambda a: ops.rms_norm(a, w), (x,), (torch.randn_like(x),))
        (y.sum() + ty.detach().sum()).backward()
    assert calls["jvp_backward"] == 0 and x.grad is not None and w.grad is not None


# ---- bad input ---------------------------------------------------------------------------------------

def test_broadcast_mismatch_names_the_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="shift"):
        ops.modulated_layer_norm(x, torch.randn(3, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="scale"):
        ops.modulated_layer_norm(x, torch.randn(2, 1, 8), torch.randn(2, 1, 7))
    with pytest.raises(ValueError, match="gate"):
        ops.gated_residual(x, torch.randn(2, 2, 8), x)
    with pytest.raises(ValueError, match="y"):
        ops.gated_residual(x, torch.randn(2, 1, 8), torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="weight"):
        ops.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="bias"):
        ops.gelu_tanh(x, torch.randn(2, 8))
    with pytest.raises(ValueError, match="weight"):
        ops.linear(x, torch.randn(4, 7))


@pytest.mark.parametrize("backend", ["naive", "torch", "extension"])
def test_dtype_and_device_mismatch_name_the_argument(backend):
    x = torch.randn(2, 3, 8)
    with use_backend(backend):
        with pytest.raises(ValueError, match="scale: dtype"):
            ops.modulated_layer_norm(x, torch.randn(2, 1, 8), torch.randn(2, 1, 8, dtype=torch.float16))
        with pytest.raises(ValueError, match="gate: dtype"):
            ops.gated_residual(x, torch.randn(8, dtype=torch.bfloat16), x)
        with pytest.raises(ValueError, match="weight: device"):
            ops.rms_norm(x, torch.randn(8, device="meta"))
        with pytest.raises(ValueError, match="tx"):
            ops.modulated_layer_norm_jvp(x, torch.randn(8), torch.randn(8), torch.randn(2, 3, 7))
        with pytest.raises(TypeError, match="x"):
            ops.gelu_tanh([1.0, 2.0])
        with pytest.raises(ValueError, match="x: expected dtype"):
            ops.gelu_tanh(torch.ones(3, dtype=torch.int64))


def test_extension_refuses_meta_tensors_with_a_reason():
    with use_backend("extension"), pytest.raises(BackendUnavailableError, match="device meta"):
        ops.gelu_tanh(torch.randn(3, 8, device="meta"))


# ---- linear: one product on the stacked [x; tx], exact FLOPs --------------------------------------

@pytest.mark.parametrize("weight_tangent", [False, True])
def test_linear_jvp_flops_are_exact(weight_tangent):
    R, K, N = 12, 16, 24
    x, tx = torch.randn(3, 4, K), torch.randn(3, 4, K)
    w, b = torch.randn(N, K) * 0.2, torch.randn(N)
    tw = torch.randn(N, K) if weight_tangent else None
    with use_backend("torch"), FlopCounterMode(display=False) as fc:
        if weight_tangent:
            y, ty = torch.func.jvp(lambda a, w_: ops.linear(a, w_, b), (x, w), (tx, tw))
        else:
            y, ty = torch.func.jvp(lambda a: ops.linear(a, w, b), (x,), (tx,))
    expected = 2 * R * K * N * (3 if weight_tangent else 2)
    assert fc.get_total_flops() == expected
    counts = fc.get_flop_counts()["Global"]
    assert counts.get(torch.ops.flowmap_kernels.linear_jvp_forward, 0) == expected
    ty_ref = tx @ w.t() + (x @ tw.t() if weight_tangent else 0)
    assert rel_err(ty, ty_ref) < TOLERANCE[torch.float32]


def test_linear_jvp_backward_flops_are_exact():
    R, K, N = 12, 16, 24
    x = torch.randn(R, K, requires_grad=True)
    tx = torch.randn(R, K, requires_grad=True)
    w = torch.randn(N, K, requires_grad=True)
    with use_backend("torch"):
        y, ty = torch.func.jvp(lambda a: ops.linear(a, w), (x,), (tx,))
        loss = (y ** 2).sum() + (ty ** 2).sum()
        with FlopCounterMode(display=False) as fc:
            loss.backward()
    counts = fc.get_flop_counts()["Global"]
    assert counts[torch.ops.flowmap_kernels.linear_jvp_backward] == 2 * (2 * R) * N * K * 2


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_primal_functions_jvp_rules(backend):
    """The public ops unpack dual inputs themselves; the primal Functions' own jvp rules (used when an op is
    reached another way) must agree, and their tangents must be differentiable."""
    from flowmap_kernels.ops import autograd as A
    from flowmap_kernels.ops.problem import ElementwiseProblem, NormProblem, OperandLayout
    from tests.ops.helpers import ref_gated_residual, ref_gelu_tanh
    dt = torch.float32
    prim, tang = make_inputs([(2, 3, 37), (2, 1, 37), (2, 1, 37)], dt, seed=11)
    x, a, b = prim
    layout_a, layout_b = OperandLayout.of(a, x), OperandLayout.of(b, x)
    ncfg = NormProblem(True, 1.0, 1e-6, layout_b, layout_a, tuple(x.shape), 6, 3, backend)
    rcfg_g = ElementwiseProblem(layout_a, tuple(x.shape), 6, 3, backend)
    bias = torch.randn(37)
    rcfg_b = ElementwiseProblem(OperandLayout.of(bias, x), tuple(x.shape), 6, 2, backend)
    w = torch.randn(5, 37) * 0.2
    cases = [
        (lambda x_, a_, b_: A.NormFunction.apply(x_, b_, a_, ncfg)[0], ref_modulated_layer_norm),
        (lambda x_, a_, b_: A.GatedFunction.apply(x_, a_, b_.expand_as(x_) * x_, rcfg_g),
         lambda x_, a_, b_: ref_gated_residual(x_, a_, b_.expand_as(x_) * x_)),
        (lambda x_, a_, b_: A.GeluFunction.apply(x_ * (1 + b_), bias, rcfg_b),
         lambda x_, a_, b_: ref_gelu_tanh(x_ * (1 + b_), bias.double())),
        (lambda x_, a_, b_: A.LinearFunction.apply(x_ + a_, w, None, backend),
         lambda x_, a_, b_: (x_ + a_) @ w.double().t()),
    ]
    from tests.ops.helpers import check_op
    for fn, ref in cases:
        check_op(fn, ref, prim, tang, dt)


@pytest.mark.parametrize("backend", ["torch", "extension"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_on_the_tangent_only(backend, dtype):
    """dL/dy is None (zero, not read by the kernels) when only the tangent enters the loss."""
    from tests.ops.helpers import ref_gated_residual, ref_gelu_tanh, ref_rms_norm
    cases = [
        (ops.modulated_layer_norm, ref_modulated_layer_norm, [(2, 3, 72), (2, 1, 72), (2, 1, 72)]),
        (ops.rms_norm, ref_rms_norm, [(2, 3, 72), (72,)]),
        (ops.layer_norm, ref_layer_norm, [(2, 3, 72), (72,), (72,)]),
        (ops.gelu_tanh, ref_gelu_tanh, [(2, 3, 72), (72,)]),
        (ops.gated_residual, ref_gated_residual, [(2, 3, 72), (2, 1, 72), (2, 3, 72)]),
    ]
    for fn, ref, shapes in cases:
        prim, tang = make_inputs(shapes, dtype, seed=13)
        wt = torch.randn(shapes[0], dtype=torch.float64)
        grads = []
        for f, ps, ts in ((fn, prim, tang), (ref, [p.double() for p in prim], [t.double() for t in tang])):
            ps = [p.clone().requires_grad_() for p in ps]
            ts = [t.clone().requires_grad_() for t in ts]
            with use_backend(backend):
                _, ty = torch.func.jvp(f, tuple(ps), tuple(ts))
                grads.append(torch.autograd.grad((ty.double() * wt).sum(), ps + ts, allow_unused=True))
        for a, b in zip(*grads):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                assert rel_err(a, b) <= TOLERANCE[dtype]


def _tangent_gradcheck(ln):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, dtype=F64, generator=g).requires_grad_()
    tx = torch.randn(3, 7, dtype=F64, generator=g)
    return torch.autograd.gradcheck(lambda a: torch.func.jvp(ln, (a,), (tx,))[1], (x,), raise_exception=False)


def test_pytorch_layer_norm_tangent_derivative_is_wrong():
    """PyTorch 2.13: the derivative of F.layer_norm's forward-mode tangent is wrong (gradcheck fails in
    float64), which is why naive.layer_norm is written with mean/var ops. If this starts failing, PyTorch
    has fixed it."""
    from flowmap_kernels.ops import naive
    assert _tangent_gradcheck(lambda a: naive.layer_norm(a, 1e-6))
    assert not _tangent_gradcheck(lambda a: torch.nn.functional.layer_norm(a, (7,), eps=1e-6))


def test_traceable_chunk_rows_divides_every_group():
    """The rows-per-chunk rule used under torch.compile divides every group size and equals the eager rule
    whenever that is a power-of-two fraction of the group."""
    from flowmap_kernels.ops.problem import chunk_rows, traceable_chunk_rows
    for lead in [(2, 5), (1, 4096), (8, 16), (3, 7, 5), (1, 1), (6, 1000)]:
        R = 1
        for d in lead:
            R *= d
        groups_of = [[R // lead[0]], [R], [R // lead[0], R], [1, R]]  # (B, 1, C) / (C,) / both / expanded
        for groups in groups_of:
            for target in (1, 3, 32, R // 8, R):
                rpc = traceable_chunk_rows(groups, target)
                assert all(g % rpc == 0 for g in groups), (lead, groups, target, rpc)
                exact = chunk_rows(groups, target)
                if (min(groups) // exact) & (min(groups) // exact - 1) == 0:
                    assert rpc == exact, (lead, groups, target, rpc, exact)


@pytest.mark.parametrize("backend", ["torch", "extension"])
def test_compiled_ops_with_dynamic_shapes(backend):
    """torch.compile(fullgraph=True) of the fused ops, called with a second token count: Dynamo makes the sizes
    symbolic (automatic dynamic shapes), where the rows-per-chunk choice (math.gcd of a SymInt) used to fail with
    'Unsupported torch.* op returned non-Tensor'. Equal to eager, forward, JVP and the backward through it."""
    g = torch.Generator().manual_seed(0)
    C = 16
    shift, scale = torch.randn(2, 1, C, generator=g), torch.randn(2, 1, C, generator=g)
    w, bias, W = torch.randn(C, generator=g), torch.randn(C, generator=g), torch.randn(C, C, generator=g) * 0.3

    def step(x, tx):
        h, th = ops.modulated_layer_norm_jvp(x, shift, scale, tx)
        h, th = ops.rms_norm_jvp(h, w, th)
        h, th = ops.linear_jvp(h, W, None, th)
        h, th = ops.gelu_tanh_jvp(h, bias, th)
        y, ty = ops.gated_residual_jvp(x, scale, h, tx, None, th)
        y2 = ops.gelu_tanh(ops.modulated_layer_norm(y, shift, scale), bias)
        return y2, ty

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with use_backend(backend):
        for n in (5, 7, 12):
            x = torch.randn(2, n, C, generator=g, requires_grad=True)
            tx = torch.randn(2, n, C, generator=g, requires_grad=True)
            outs = []
            for fn in (compiled, step):
                y, ty = fn(x, tx)
                outs.append((y, ty, *torch.autograd.grad(y.square().sum() + ty.square().sum(), (x, tx))))
            for a, b in zip(*outs):
                assert rel_err(a, b) <= TOLERANCE[torch.float32]
