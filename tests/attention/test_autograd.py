"""Autograd modes: gradcheck through the primal, the tangent and the explicit op; double backward;
torch.func.grad over torch.func.jvp; a JVP of the JVP (forward-over-forward)."""
import pytest
import torch

import flowmap_kernels as fk
from tests.attention.backend_env import BACKENDS, on_backend
from tests.attention.cases import Case
from tests.numerics import rel_err
from tests.reference import jvp_of_jvp, ref_attention

GRADCHECK_CASES = [
    Case(batch=1, q_heads=2, kv_heads=1, q_len=5, kv_len=7, head_dim=3, v_head_dim=4, causal=True),
    Case(batch=1, q_heads=2, kv_heads=2, q_len=6, kv_len=4, head_dim=4, mask="float_dead_rows", scale=0.9),
    Case(batch=2, q_heads=1, kv_heads=1, q_len=3, kv_len=5, head_dim=2, mask="bool"),
]


def _inputs(case):
    t = case.make(torch.float64, requires_grad=True)
    return t, [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=Case.id)
def test_gradcheck_primal(case):
    t, xs = _inputs(case)
    assert torch.autograd.gradcheck(lambda q, k, v: fk.attention(q, k, v, **case.kwargs), xs[:3])


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=Case.id)
def test_gradcheck_tangent_through_func_jvp(case):
    t, xs = _inputs(case)

    def tangent(q, k, v, tq, tk, tv):
        return torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **case.kwargs), (q, k, v), (tq, tk, tv))[1]

    assert torch.autograd.gradcheck(tangent, xs)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=Case.id)
def test_gradcheck_explicit_jvp(case):
    t, xs = _inputs(case)
    assert torch.autograd.gradcheck(lambda *a: fk.attention_jvp(*a, **case.kwargs), xs)


@pytest.mark.parametrize("case", GRADCHECK_CASES[:2], ids=Case.id)
def test_double_backward_of_the_primal(case):
    """create_graph=True: a gradient penalty differentiates the primal backward."""
    t, xs = _inputs(case)
    q, k, v = xs[:3]
    gg = []
    for backend in ("torch", "naive"):
        with fk.use_backend(backend):
            o = fk.attention(q, k, v, **case.kwargs)
            g = torch.autograd.grad((o * t["wo"]).sum(), (q, k, v), create_graph=True)
            penalty = sum((x ** 2).sum() for x in g)
            gg.append(torch.autograd.grad(penalty, (q, k, v)))
    for a, b in zip(*gg):
        assert rel_err(a, b) < 1e-9
    assert torch.autograd.gradgradcheck(lambda q, k, v: fk.attention(q, k, v, **case.kwargs), (q, k, v))


def test_func_grad_over_func_jvp():
    case = Case(q_heads=2, kv_heads=1, q_len=9, kv_len=11, head_dim=5, causal=True)
    t = case.make(torch.float64)

    def loss(q, k, v, attend):
        _, to = torch.func.jvp(lambda a, b, c: attend(a, b, c, **case.kwargs), (q, k, v), (t["tq"], t["tk"], t["tv"]))
        return (to ** 2).sum()

    ours = torch.func.grad(loss, argnums=(0, 1, 2))(t["q"], t["k"], t["v"], fk.attention)
    ref = torch.func.grad(loss, argnums=(0, 1, 2))(t["q"], t["k"], t["v"], ref_attention)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-9


def test_mean_flow_style_stop_gradient_skips_the_tangent_backward(monkeypatch):
    """A detached tangent must not run the backward through the JVP (MeanFlow / sCM cost model)."""
    from flowmap_kernels.attention import kernels
    calls = {"jvp_backward": 0, "backward": 0}
    real_jb, real_b = kernels.attention_jvp_backward, kernels.attention_backward

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kernels, "attention_jvp_backward", count("jvp_backward", real_jb))
    monkeypatch.setattr(kernels, "attention_backward", count("backward", real_b))
    case = Case(q_len=8, kv_len=8, head_dim=4)
    t = case.make(torch.float64, requires_grad=True)
    o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c), (t["q"], t["k"], t["v"]),
                           (t["tq"], t["tk"], t["tv"]))
    ((o - to.detach()) ** 2).sum().backward()
    assert calls == {"jvp_backward": 0, "backward": 1}


def test_fallback_jvp_rule_of_the_primal_function():
    """AttentionFunction's own jvp rule (used where ``attention`` cannot see the tangents) is exact."""
    from flowmap_kernels.attention import make_problem
    from flowmap_kernels.attention.autograd import AttentionFunction
    from tests.reference import loss_on_outputs, ref_grads

    case = Case(q_heads=4, kv_heads=2, q_len=19, kv_len=23, head_dim=6, causal=True)
    t = case.make(torch.float64, requires_grad=True)
    xs = [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]
    p = make_problem(*xs[:3], **{k: v for k, v in case.kwargs.items()})
    o, to = torch.func.jvp(lambda a, b, c: AttentionFunction.apply(a, b, c, None, p, "torch")[0],
                           tuple(xs[:3]), tuple(xs[3:]))
    grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), xs)
    (ro, rto), rgrads = ref_grads(*xs, t["wo"], t["wt"], **case.kwargs)
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) < 1e-12


FOF_CASES = GRADCHECK_CASES + [Case(batch=2, q_heads=4, kv_heads=2, q_len=17, kv_len=33, head_dim=16,
                                    v_head_dim=8, causal=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FOF_CASES, ids=Case.id)
def test_jvp_of_jvp(backend, case):
    """Forward-over-forward (nested torch.func.jvp: second derivatives along two directions) through
    attention and through the explicit attention_jvp, against the same nesting of the float64 reference;
    "triton" in float32 (its first-order pass runs the kernels, the second the naive recomputation)."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    t = case.make(dtype)
    g = torch.Generator().manual_seed(11)
    primals = tuple(t[n] for n in ("q", "k", "v"))
    inner = tuple(t[n] for n in ("tq", "tk", "tv"))
    outer = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype) for x in primals)
    (ro, rto), (rdo, rdto) = jvp_of_jvp(lambda *a: ref_attention(*a, **case.kwargs),
                                        *(tuple(x.double() for x in xs) for xs in (primals, inner, outer)))
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    with on_backend(backend):
        (o, to), (do, dto) = jvp_of_jvp(lambda *a: fk.attention(*a, **case.kwargs), primals, inner, outer)
        (o2, to2), (do2, dto2) = torch.func.jvp(lambda *a: fk.attention_jvp(*a, *inner, **case.kwargs), primals, outer)
    for got, want in ((o, ro), (to, rto), (do, rdo), (dto, rdto), (o2, ro), (to2, rto), (do2, rdo), (dto2, rdto)):
        assert got.dtype == dtype and rel_err(got, want) < tol


def test_gradcheck_through_jvp_of_jvp():
    """Reverse over forward-over-forward: the second-order tangent is differentiable (gradcheck, float64)."""
    case = GRADCHECK_CASES[0]
    t, xs = _inputs(case)
    outer = tuple(torch.randn_like(x) for x in xs[:3])

    def second(q, k, v):
        return jvp_of_jvp(lambda *a: fk.attention(*a, **case.kwargs), (q, k, v), xs[3:], outer)[1][1]
    assert torch.autograd.gradcheck(second, xs[:3])


def test_jacfwd_of_jacfwd():
    """The Hessian by forward-over-forward equals the reference's."""
    case = Case(batch=1, q_heads=1, kv_heads=1, q_len=3, kv_len=4, head_dim=2, causal=True)
    t = case.make(torch.float64)

    def scalar(attend):
        return lambda q: attend(q, t["k"], t["v"], **case.kwargs).sin().sum()
    with fk.use_backend("torch"):
        ours = torch.func.jacfwd(torch.func.jacfwd(scalar(fk.attention)))(t["q"])
    ref = torch.func.jacfwd(torch.func.jacfwd(scalar(ref_attention)))(t["q"])
    assert rel_err(ours, ref) < 1e-10
