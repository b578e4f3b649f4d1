"""Float masks as learned biases: gradients (and tangents) with respect to ``attn_mask``.

Against tests/reference.py in float64 autograd: the mask's gradient through O (primal backward) and through
(O, tO) (backward through the JVP, by torch.func.jvp and by attention_jvp), for masks that broadcast along
every dim, with -inf entries, GQA, Lq != Lk and Dv != D; second derivatives (gradgradcheck), vmap (jacrev,
per-example gradients), forward-over-reverse, and a mask with a forward-mode tangent (served by the naive math).
"""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels as fk
from tests.attention.backend_env import BACKENDS, dtypes_of, on_backend
from tests.numerics import rel_err, tolerance
from tests.reference import loss_on_outputs, ref_attention, ref_jvp

# (B, Hq, Hkv, Lq, Lk, D, Dv, mask shape)
CASES = [
    (2, 2, 2, 17, 33, 16, 16, (17, 33)),
    (1, 4, 2, 40, 23, 8, 12, (1, 4, 40, 23)),
    (2, 3, 3, 9, 70, 24, 24, (2, 1, 1, 70)),
    (2, 2, 1, 20, 20, 32, 32, (2, 2, 20, 20)),
    (1, 3, 3, 12, 7, 16, 16, (3, 1, 7)),
    (1, 2, 2, 5, 300, 16, 16, (1, 1, 5, 300)),
]


def _inputs(case, dtype, seed=0):
    B, Hq, Hkv, Lq, Lk, D, Dv, mshape = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, Hq, Lq, D), r(B, Hkv, Lk, D), r(B, Hkv, Lk, Dv)
    tq, tk, tv = r(B, Hq, Lq, D), r(B, Hkv, Lk, D), r(B, Hkv, Lk, Dv)
    mask = r(*mshape)
    mask[..., -1, 0] = float("-inf")  # a blocked entry: its gradient is 0
    wo, wt = r(B, Hq, Lq, Dv), r(B, Hq, Lq, Dv)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return [cast(x) for x in (q, k, v, tq, tk, tv, mask)], (wo, wt), Hq != Hkv


def _leaves(xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _ref_primal_grads(q, k, v, mask, wo, gqa):
    leaves = _leaves([x.double() for x in (q, k, v, mask)])
    o = ref_attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=gqa)
    return torch.autograd.grad((o * wo).sum(), leaves)


def _ref_jvp_grads(q, k, v, tq, tk, tv, mask, wo, wt, gqa):
    leaves = _leaves([x.double() for x in (q, k, v, tq, tk, tv, mask)])
    o, to = ref_jvp(*leaves[:6], attn_mask=leaves[6], enable_gqa=gqa)
    return torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)


def _params(with_16bit=True):
    out = []
    for backend in BACKENDS:
        name = backend.values[0] if hasattr(backend, "values") else backend
        marks = backend.marks if hasattr(backend, "marks") else ()
        dtypes = dtypes_of(name) if with_16bit else [d for d in dtypes_of(name) if d in (torch.float64,
                                                                                           torch.float32)]
        out += [pytest.param(name, d, marks=marks, id=f"{name}-{str(d)[6:]}") for d in dtypes]
    return out


def _check(got, want, dtype, extra=0):
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"gradient {i} is None"
        assert torch.isfinite(a).all(), f"gradient {i} is not finite"
        assert rel_err(a, b) < tolerance(dtype, extra), (i, rel_err(a, b))


@pytest.mark.parametrize("backend,dtype", _params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[7])))
def test_mask_gradient_through_the_output(backend, dtype, case):
    (q, k, v, _, _, _, mask), (wo, _), gqa = _inputs(case, dtype)
    want = _ref_primal_grads(q, k, v, mask, wo, gqa)
    leaves = _leaves([q, k, v, mask])
    with on_backend(backend):
        o = fk.attention(*leaves[:3], attn_mask=leaves[3], enable_gqa=gqa)
        got = torch.autograd.grad((o.double() * wo).sum(), leaves)
    assert got[3].shape == mask.shape and got[3].dtype == mask.dtype
    assert torch.all(got[3][..., -1, 0] == 0)
    _check(got, want, dtype, 400)


@pytest.mark.parametrize("backend,dtype", _params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[7])))
@pytest.mark.parametrize("entry", ["func.jvp", "attention_jvp"])
def test_mask_gradient_through_the_tangent(backend, dtype, case, entry):
    (q, k, v, tq, tk, tv, mask), (wo, wt), gqa = _inputs(case, dtype, seed=1)
    want = _ref_jvp_grads(q, k, v, tq, tk, tv, mask, wo, wt, gqa)
    leaves = _leaves([q, k, v, tq, tk, tv, mask])
    with on_backend(backend):
        if entry == "func.jvp":
            o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, attn_mask=leaves[6], enable_gqa=gqa),
                                   tuple(leaves[:3]), tuple(leaves[3:6]))
        else:
            o, to = fk.attention_jvp(*leaves[:6], attn_mask=leaves[6], enable_gqa=gqa)
        got = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
    _check(got, want, dtype, 400)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_mask_gradient_without_the_tangent_gradient(backend):
    """fk.func.jvp(..., tangent_grad=False) style: the tangent output is not differentiated, so the mask's
    gradient comes from O alone."""
    (q, k, v, tq, tk, tv, mask), (wo, _), _ = _inputs(CASES[0], torch.float64)
    m = mask.clone().requires_grad_(True)
    with on_backend(backend):
        o, to = fk.attention_jvp(q, k, v, tq, tk, tv, attn_mask=m)
        (g,) = torch.autograd.grad((o * wo).sum(), m)
    (want,) = torch.autograd.grad((ref_attention(q, k, v, attn_mask=m) * wo).sum(), m)
    assert rel_err(g, want) < 1e-12


def test_second_derivatives_include_the_mask():
    """gradgradcheck in float64 on the fused backward passes (torch backend): second derivatives of O and of
    (O, tO) with respect to all inputs and the mask."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    q, k, v, tq, tk, tv = r(1, 2, 5, 4), r(1, 2, 6, 4), r(1, 2, 6, 3), r(1, 2, 5, 4), r(1, 2, 6, 4), r(1, 2, 6, 3)
    mask = r(2, 1, 6)
    with fk.use_backend("torch"):
        f = lambda q, k, v, m: fk.attention(q, k, v, attn_mask=m)  # noqa: E731
        assert torch.autograd.gradgradcheck(f, (q, k, v, mask))
        fj = lambda *a: fk.attention_jvp(*a[:6], attn_mask=a[6])  # noqa: E731
        assert torch.autograd.gradcheck(fj, (q, k, v, tq, tk, tv, mask))
        assert torch.autograd.gradgradcheck(fj, (q, k, v, tq, tk, tv, mask))


@pytest.mark.parametrize("mshape", [(5, 6), (1, 2, 5, 6), (2, 1, 1, 6)])
def test_vmap_jacrev_and_per_example_gradients(mshape):
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, mask = r(2, 2, 5, 4), r(2, 2, 6, 4), r(2, 2, 6, 3), r(*mshape)
    with fk.use_backend("torch"):
        jac = torch.func.jacrev(lambda m: fk.attention(q, k, v, attn_mask=m).sum((0, 1, 3)))(mask)
    want = torch.func.jacrev(lambda m: ref_attention(q, k, v, attn_mask=m).sum((0, 1, 3)))(mask)
    assert rel_err(jac, want) < 1e-12
    # per-example gradients of a shared bias: vmap over the batch of grad with respect to the mask
    loss = lambda att, qi, m: att(qi[None], k[:1], v[:1], m[:1] if len(mshape) == 4 else m).square().sum()  # noqa
    with fk.use_backend("torch"):
        per = torch.func.vmap(torch.func.grad(lambda qi, m: loss(
            lambda *a: fk.attention(*a[:3], attn_mask=a[3]), qi, m), argnums=1), in_dims=(0, None))(q, mask)
    want = torch.func.vmap(torch.func.grad(lambda qi, m: loss(
        lambda *a: ref_attention(*a[:3], attn_mask=a[3]), qi, m), argnums=1), in_dims=(0, None))(q, mask)
    assert rel_err(per, want) < 1e-12


def test_forward_over_reverse_with_a_learned_mask():
    """jacfwd of grad with respect to q while the mask also requires grad (the backward's JVP rule)."""
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, mask = r(1, 2, 4, 3), r(1, 2, 5, 3), r(1, 2, 5, 2), r(4, 5)

    def hess(att):
        return torch.func.jacfwd(torch.func.grad(lambda qq, m: att(qq, k, v, attn_mask=m).square().sum(),
                                                 argnums=(0, 1)), argnums=0)(q, mask)
    with fk.use_backend("torch"):
        got = hess(fk.attention)
    want = hess(ref_attention)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_mask_tangent_is_followed(backend):
    """A float mask that depends on the JVP's inputs (its tangent is nonzero): O, tO and the gradients through
    both match the reference (these calls run the naive math)."""
    (q, k, v, tq, tk, tv, mask), (wo, wt), _ = _inputs(CASES[1], torch.float64, seed=2)
    tmask = torch.randn_like(mask)
    tmask[..., -1, 0] = 0.0
    leaves = _leaves([q, k, v, mask])

    def run(att):
        return torch.func.jvp(lambda a, b, c, m: att(a, b, c, attn_mask=m, enable_gqa=True), tuple(leaves),
                              (tq, tk, tv, tmask))
    with on_backend(backend):
        o, to = run(fk.attention)
        got = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
    ro, rto = run(ref_attention)
    want = torch.autograd.grad(loss_on_outputs(ro, rto, wo, wt), leaves)
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    _check(got, want, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_mask_with_16bit_inputs(backend, dtype):
    """SDPA takes a float32 mask with 16-bit inputs (autocast builds them so): added to the float32 logits
    unrounded; O, tO and the mask's gradient (float32) against the reference."""
    (q, k, v, tq, tk, tv, mask), (wo, wt), gqa = _inputs(CASES[0], dtype, seed=6)
    mask32 = _inputs(CASES[0], torch.float32, seed=6)[0][6]
    want = _ref_jvp_grads(q, k, v, tq, tk, tv, mask32, wo, wt, gqa)
    m = mask32.clone().requires_grad_(True)
    with on_backend(backend):
        o, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, attn_mask=m), (q, k, v), (tq, tk, tv))
        (g,) = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), m)
    ro, rto = ref_jvp(q, k, v, tq, tk, tv, attn_mask=mask32)
    assert o.dtype == dtype and g.dtype == torch.float32
    assert rel_err(o, ro) < tolerance(dtype) and rel_err(to, rto) < tolerance(dtype)
    assert rel_err(g, want[6]) < tolerance(dtype)


def test_function_jvp_rules_follow_a_mask_tangent():
    """The Functions' own jvp rules (forward-mode levels that fk.attention's dual unpacking cannot see) follow
    a mask tangent: AttentionFunction's tO and AttentionJVPFunction's forward-over-forward, against
    torch.func.jvp of the reference."""
    import torch.autograd.forward_ad as fwAD
    from flowmap_kernels.attention import make_problem
    from flowmap_kernels.attention.autograd import AttentionFunction, AttentionJVPFunction
    (q, k, v, tq, tk, tv, mask), _, _ = _inputs(CASES[0], torch.float64, seed=7)
    tmask = torch.randn_like(mask)
    tmask[..., -1, 0] = 0.0
    p = make_problem(q, k, v, mask)
    with fwAD.dual_level():
        o, _ = AttentionFunction.apply(q, k, v, fwAD.make_dual(mask, tmask), p, "torch")
        got = fwAD.unpack_dual(o).tangent
        o2, to2, _, _ = AttentionJVPFunction.apply(q, k, v, tq, tk, tv, fwAD.make_dual(mask, tmask), p, "torch")
        got_o, got_to = fwAD.unpack_dual(o2).tangent, fwAD.unpack_dual(to2).tangent
    want = torch.func.jvp(lambda m: ref_attention(q, k, v, attn_mask=m), (mask,), (tmask,))[1]
    want_o, want_to = torch.func.jvp(lambda m: ref_jvp(q, k, v, tq, tk, tv, attn_mask=m), (mask,), (tmask,))[1]
    assert rel_err(got, want) < 1e-12 and rel_err(got_o, want_o) < 1e-12 and rel_err(got_to, want_to) < 1e-12
