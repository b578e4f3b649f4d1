"""Edges of the attention API: argument types as scaled_dot_product_attention checks them, tangents of the
wrong dtype on every entry point and backend, zero heads and zero keys against SDPA."""
import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowmap_kernels as fk
from tests.attention.backend_env import BACKENDS, on_backend
from tests.numerics import rel_err
from tests.reference import loss_on_outputs, ref_attention, ref_grads, ref_jvp


def _qkv(dtype=torch.float32, b=1, hq=2, hkv=2, lq=4, lk=6, d=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
            for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, dv))]


@pytest.mark.parametrize("is_causal", ["False", "True", 0, 1, np.bool_(True), None, torch.tensor(True)],
                         ids=lambda v: f"{type(v).__name__}-{v}")
def test_is_causal_must_be_bool(is_causal):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scaled_dot_product_attention"):  # SDPA refuses them too
        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    with pytest.raises(TypeError, match=r"is_causal: expected a bool"):
        fk.attention(q, k, v, is_causal=is_causal)
    with pytest.raises(TypeError, match=r"is_causal: expected a bool"):
        fk.attention_jvp(q, k, v, q, k, v, is_causal=is_causal)


def test_string_false_is_no_longer_causal_under_patch():
    """is_causal="False" used to give the causal result; under patch_sdpa the call now falls back to the
    original function, which raises SDPA's own TypeError (never a different result)."""
    q, k, v = _qkv()
    with fk.patch_sdpa(), pytest.warns(UserWarning), pytest.raises(TypeError, match="is_causal"):
        F.scaled_dot_product_attention(q, k, v, is_causal="False")


@pytest.mark.parametrize("scale", ["0.5", True, [0.5], 1j, torch.tensor([0.5]), torch.tensor(True),
                                   torch.tensor(0.5 + 1j), torch.tensor(0.5, requires_grad=True)],
                         ids=["str", "bool", "list", "complex", "tensor-1d", "tensor-bool", "tensor-complex",
                              "tensor-requires-grad"])
def test_scale_must_be_none_or_a_real_number(scale):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"scale: (expected None|a tensor that requires grad)"):
        fk.attention(q, k, v, scale=scale)
    with pytest.raises(TypeError, match=r"scale: (expected None|a tensor that requires grad)"):
        fk.attention_jvp(q, k, v, None, None, v, scale=scale)


def test_scale_with_a_forward_mode_tangent_is_refused():
    """The scale is a constant of the fused passes: a tangent on it (which SDPA drops silently) is a TypeError,
    under torch.func.jvp and forward_ad; a 0-d tensor scale without a tangent still works inside a JVP."""
    q, k, v = _qkv(torch.float64)
    with pytest.raises(TypeError, match=r"scale: a tensor with a forward-mode tangent"):
        torch.func.jvp(lambda s: fk.attention(q, k, v, scale=s), (torch.tensor(0.5),), (torch.tensor(1.0),))
    with fwAD.dual_level(), pytest.raises(TypeError, match=r"scale: a tensor with a forward-mode tangent"):
        fk.attention_jvp(q, k, v, None, None, v, scale=fwAD.make_dual(torch.tensor(0.5), torch.tensor(1.0)))
    tq = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
    o, to = torch.func.jvp(lambda a: fk.attention(a, k, v, scale=torch.tensor(0.5)), (q,), (tq,))
    ro, rto = ref_jvp(q, k, v, tq, torch.zeros_like(k), torch.zeros_like(v), scale=0.5)
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12


@pytest.mark.parametrize("scale", [2, 0.25, np.float32(0.25), np.float64(0.7), torch.tensor(0.3),
                                   torch.tensor(3, dtype=torch.int64)], ids=lambda v: f"{type(v).__name__}-{v}")
def test_real_scales_are_accepted(scale):
    """Python and NumPy reals, and 0-d real tensors (as SDPA takes them), against the reference and SDPA."""
    q, k, v = _qkv(torch.float64)
    want = ref_attention(q, k, v, scale=float(scale))
    assert rel_err(fk.attention(q, k, v, scale=scale), want) < 1e-12
    assert rel_err(F.scaled_dot_product_attention(q, k, v, scale=scale), want) < 1e-12


def _entry_points(q, k, v, t, which):
    """The three ways of asking for a tangent, with ``t`` as the tangent of input ``which``."""
    tangents = [torch.zeros_like(x) for x in (q, k, v)]
    tangents[which] = t
    explicit = [None, None, None]
    explicit[which] = t

    def func_jvp():
        return torch.func.jvp(fk.attention, (q, k, v), tuple(tangents))

    def forward_ad():
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, tx) for x, tx in zip((q, k, v), tangents)]
            return fwAD.unpack_dual(fk.attention(*duals)).tangent

    def explicit_jvp():
        return fk.attention_jvp(q, k, v, *explicit)

    return {"func_jvp": func_jvp, "forward_ad": forward_ad, "attention_jvp": explicit_jvp}


@pytest.mark.parametrize("entry", ["func_jvp", "forward_ad", "attention_jvp"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["query", "key", "value"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_tangent_of_a_float32_primal_is_one_clear_error(backend, which, entry):
    q, k, v = _qkv(torch.float32)
    t = torch.randn_like((q, k, v)[which], dtype=torch.float64)
    name = ("query", "key", "value")[which]
    with on_backend(backend), pytest.raises(
            ValueError, match=rf"tangent of {name}: expected dtype torch.float32 \(the dtype of {name}\), "
                              rf"got torch.float64"):
        _entry_points(q, k, v, t, which)[entry]()


def _sdpa(q, k, v, **kw):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("shape", [
    dict(hq=0, hkv=0),                      # zero heads
    dict(hq=0, hkv=2, gqa=True),            # zero query heads, grouped-query
    dict(lk=0),                             # zero keys: SDPA gives zeros
    dict(lk=0, hq=4, hkv=2, gqa=True),      # zero keys, grouped-query
    dict(hq=0, hkv=0, lk=0),
    dict(lq=0),
    dict(b=0),
], ids=["H0", "Hq0-gqa", "Lk0", "Lk0-gqa", "H0-Lk0", "Lq0", "B0"])
@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_empty_shapes_match_sdpa(backend, mask, shape):
    shape = dict(shape)
    gqa = shape.pop("gqa", False)
    q, k, v = (x.requires_grad_() for x in _qkv(torch.float64, **shape))
    lq, lk = q.shape[2], k.shape[2]
    kw = dict(enable_gqa=gqa)
    if mask == "bool":
        kw["attn_mask"] = torch.ones(lq, lk, dtype=torch.bool)
    elif mask == "float":
        kw["attn_mask"] = torch.zeros(lq, lk, dtype=torch.float64)
    elif mask == "causal":
        kw["is_causal"] = True
    want = _sdpa(q, k, v, **kw)
    tq, tk, tv = (torch.randn_like(x).requires_grad_() for x in (q, k, v))
    with on_backend(backend):
        o = fk.attention(q, k, v, **kw)
        o2, to = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), (q, k, v), (tq, tk, tv))
        o3, to3 = fk.attention_jvp(q, k, v, tq, tk, tv, **kw)
    assert o.shape == want.shape == o2.shape == to.shape == o3.shape == to3.shape
    assert torch.equal(o, want) and torch.equal(o2, want) and torch.equal(o3, want)
    assert not to.any() and not to3.any()
    if want.numel():
        grads = torch.autograd.grad((o * torch.randn_like(o)).sum() + to.square().sum(), (q, k, v, tq),
                                    allow_unused=True, materialize_grads=True)
        assert all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead, mask_shape", [((), None), ((), (4, 5, 6)), ((2, 3), None), ((2, 1), (1, 5, 6)),
                                              ((2, 3), (2, 1, 1, 5, 6)), ((1, 2, 2), (2, 1, 1, 5, 6))])
def test_sdpa_shapes_3d_and_above_4d(backend, lead, mask_shape):
    """SDPA's shapes: 3-d (heads, tokens, dim) and (N, ..., heads, tokens, dim) inputs, masks broadcasting
    over the leading dims; O, tO and the gradients through both against the float64 reference on the
    inputs flattened to 4-d by hand, and O against SDPA itself."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32
    hq, hkv = 4, 2
    q, k, v, tq, tk, tv = (torch.randn(*lead, h, n, d, generator=g, dtype=torch.float64).to(dtype)
                           for h, n, d in ((hq, 5, 8), (hkv, 6, 8), (hkv, 6, 3)) * 2)
    mask = None if mask_shape is None else torch.rand(*mask_shape, generator=g) > 0.3
    kw = dict(attn_mask=mask, enable_gqa=True)
    flat = lambda x: x.reshape(-1, *x.shape[-3:])  # noqa: E731
    fmask = None if mask is None else (mask if mask.dim() <= 3 else
                                       flat(mask.expand(*lead, *mask.shape[-3:])))
    wo, wt = (torch.randn(*lead, hq, 5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    (ro, rto), rgrads = ref_grads(*(flat(x) if x.dim() > 3 else x[None] for x in (q, k, v, tq, tk, tv)),
                                  flat(wo) if lead else wo[None], flat(wt) if lead else wt[None],
                                  attn_mask=fmask, enable_gqa=True)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    with on_backend(backend):
        o, to = fk.attention_jvp(*leaves, **kw)
        o2, to2 = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), (q, k, v), (tq, tk, tv))
    assert o.shape == to.shape == (*lead, hq, 5, 3)
    tol = 1e-5
    assert rel_err(o, ro.reshape(o.shape)) < tol and rel_err(to, rto.reshape(to.shape)) < tol
    assert rel_err(o2, ro.reshape(o.shape)) < tol and rel_err(to2, rto.reshape(to.shape)) < tol
    sdpa_mask = None if mask is None else mask.expand(*lead, hq, 5, 6) if lead else mask
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=sdpa_mask, enable_gqa=True)
    assert rel_err(o, torch.nan_to_num(want)) < tol
    (o.double() * wo).sum().add((to.double() * wt).sum() + 0.5 * (to.double() ** 2).sum()).backward()
    for x, r in zip(leaves, rgrads):
        assert x.grad.shape == x.shape and rel_err(x.grad, r.reshape(x.shape)) < 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_sdpa_shapes_2d(backend, mask_kind):
    """2-d (tokens, dim) inputs, as SDPA takes them: one head; O and tO against the float64 reference, O
    against SDPA, and the gradients of a loss on both against the reference on the 4-d view."""
    g = torch.Generator().manual_seed(5)
    q, k, v, tq, tk, tv = (torch.randn(n, d, generator=g, dtype=torch.float64).float()
                           for n, d in ((5, 8), (6, 8), (6, 3)) * 2)
    mask = {None: None, "bool": torch.rand(5, 6, generator=g) > 0.3, "float": torch.randn(6, generator=g)}[mask_kind]
    wo, wt = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2))
    (ro, rto), rgrads = ref_grads(*(x[None, None] for x in (q, k, v, tq, tk, tv, wo, wt)), attn_mask=mask)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    with on_backend(backend):
        o, to = fk.attention_jvp(*leaves, attn_mask=mask)
        o2, to2 = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, attn_mask=mask), (q, k, v), (tq, tk, tv))
    assert o.shape == to.shape == o2.shape == (5, 3)
    for got, want in ((o, ro), (to, rto), (o2, ro), (to2, rto)):
        assert rel_err(got, want.reshape(5, 3)) < 1e-5
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    assert rel_err(o, want) < 1e-5
    loss_on_outputs(o, to, wo, wt).backward()
    for x, r in zip(leaves, rgrads):
        assert x.grad.shape == x.shape and rel_err(x.grad, r.reshape(x.shape)) < 5e-5


def _ref_broadcast(xs, wo, wt, lead, **kw):
    """Float64 (O, tO) and the gradients of loss_on_outputs for q, k, v, tq, tk, tv whose dims before
    (heads, tokens, dim) broadcast to ``lead`` as in SDPA (and without GQA, heads of 1 to the others'): each
    expanded and flattened by hand."""
    leaves = [x.detach().double().requires_grad_(True) for x in xs]
    nd = len(lead) + 3
    flat = [x.reshape((1,) * (nd - x.dim()) + tuple(x.shape)).expand(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:])
            if x.dim() >= 3 else x[None, None] for x in leaves]
    if not kw.get("enable_gqa"):  # a heads dim of 1 stretches too
        heads = max(x.shape[1] for x in flat)
        flat = [x.expand(x.shape[0], heads, *x.shape[2:]) for x in flat]
    mask = kw.get("attn_mask")
    if mask is not None and mask.dim() > 3:
        kw = {**kw, "attn_mask": mask.expand(*lead, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])}
    o, to = ref_jvp(*flat, **kw)
    out_shape = (*lead, *o.shape[1:]) if nd > 3 else o.shape[-3 if xs[0].dim() == 3 else -2:]
    o, to = o.reshape(out_shape), to.reshape(out_shape)
    grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
    return (o.detach(), to.detach()), grads


# (query, key, value) dims before (tokens, dim), incl. heads; the broadcast leading dims; enable_gqa; mask shape
BROADCAST_CASES = {
    "5d-q-4d-kv-gqa": ((2, 3, 4), (3, 2), (3, 2), (2, 3), True, None),
    "both-broadcast": ((2, 1, 2), (1, 3, 2), (1, 3, 2), (2, 3), False, (3, 1, 5, 6)),
    "4d-q-3d-kv-one-head": ((2, 2), (1,), (1,), (2,), False, (5, 6)),
    "3d-q-4d-kv": ((2,), (2, 2), (2, 2), (2,), False, None),
    "key-value-leads-differ": ((2, 3, 2), (2, 1, 2), (1, 3, 2), (2, 3), False, (2, 3, 1, 5, 6)),
    "4d-batch-and-head-broadcast": ((2, 4), (1, 1), (1, 1), (2,), False, None),
    "one-query-head": ((2, 1), (2, 3), (2, 3), (2,), False, (3, 5, 6)),
    "one-key-head-value-several": ((2, 3), (2, 1), (2, 3), (2,), False, None),
    "3d-one-query-head-one-value-head": ((1,), (3,), (1,), (), False, (1, 5, 6)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BROADCAST_CASES)
def test_sdpa_broadcasting_of_leading_dims_and_one_key_head(backend, case):
    """SDPA broadcasts the dims before (tokens, dim): fewer dims read with leading ones, dims of 1 stretched
    (without enable_gqa, a heads dim of 1 in any input too). O and tO of fk.attention under torch.func.jvp and of
    attention_jvp against the float64 reference on inputs broadcast by hand, O against SDPA, and the gradients
    (summed over the broadcast dims) of a loss on both outputs."""
    qd, kd, vd, lead, gqa, mask_shape = BROADCAST_CASES[case]
    g = torch.Generator().manual_seed(11)
    xs = [torch.randn(*dims, n, d, generator=g, dtype=torch.float64).float()
          for dims, n, d in ((qd, 5, 8), (kd, 6, 8), (vd, 6, 3)) * 2]
    mask = None if mask_shape is None else torch.rand(*mask_shape, generator=g) > 0.3
    kw = dict(attn_mask=mask, enable_gqa=gqa)
    want = F.scaled_dot_product_attention(*(x.double() for x in xs[:3]), **kw)
    wo, wt = (torch.randn(want.shape, generator=g, dtype=torch.float64) for _ in range(2))
    (ro, rto), rgrads = _ref_broadcast(xs, wo, wt, lead, **kw)
    assert ro.shape == want.shape and rel_err(ro, torch.nan_to_num(want)) < 1e-12
    leaves = [x.clone().requires_grad_(True) for x in xs]
    with on_backend(backend):
        o2, to2 = torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **kw), tuple(xs[:3]), tuple(xs[3:]))
        o, to = fk.attention_jvp(*leaves, **kw)
    assert o.shape == to.shape == o2.shape == want.shape
    for got, ref in ((o, ro), (to, rto), (o2, ro), (to2, rto)):
        assert rel_err(got, ref) < 1e-5
    loss_on_outputs(o, to, wo, wt).backward()
    for x, r in zip(leaves, rgrads):
        assert x.grad.shape == x.shape and rel_err(x.grad, r) < 5e-5


@pytest.mark.parametrize("shapes, pattern", [
    (((2, 2, 5, 8), (3, 2, 6, 8), (3, 2, 6, 8)), r"key/value: batch size must match query's 2"),
    (((2, 3, 2, 5, 8), (3, 2, 6, 8), (2, 2, 6, 8)), r"value: leading dims \(1, 2\) do not broadcast with query's "
                                                    r"\(2, 3\)"),
    (((2, 3, 2, 5, 8), (4, 2, 2, 6, 8), (2, 2, 6, 8)), r"key: leading dims \(4, 2\) do not broadcast"),
    (((2, 5, 8), (2, 6, 8), (6,)), r"value: expected at least 2 dims"),
    (((4, 5, 8), (2, 6, 8), (2, 6, 8)), r"key: 2 heads differ from query's 4; pass enable_gqa=True"),
])
def test_sdpa_leading_dims_that_do_not_broadcast_are_named(shapes, pattern):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=pattern):
        fk.attention(q, k, v)
    with pytest.raises(ValueError, match=pattern):
        fk.attention_jvp(q, k, v, None, None, None)


def test_sdpa_shapes_tangent_shape_is_checked_before_flattening():
    q, k, v = (x[None].expand(2, 3, *x.shape[1:]).contiguous() for x in _qkv())
    with pytest.raises(ValueError, match=r"tangent of key: expected shape \(2, 3, 2, 6, 8\), got \(3, 2, 2, 6, 8\)"):
        fk.attention_jvp(q, k, v, None, torch.zeros(3, 2, 2, 6, 8), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batches", [(3, 1, 1), (1, 2, 2)], ids=["kv-batch-1", "q-batch-1"])
def test_batch_of_one_broadcasts_as_in_sdpa(backend, batches):
    """A key/value batch of 1 serves every query batch (shared context) and the reverse, as SDPA broadcasts
    them (expanded views, never copies): O, tO and the gradients of a loss on both against the reference on the
    expanded inputs; O against SDPA."""
    g = torch.Generator().manual_seed(6)
    bq, bk, _ = batches
    shapes = ((bq, 2, 9, 8), (bk, 2, 11, 8), (bk, 2, 11, 5))
    q, k, v, tq, tk, tv = (torch.randn(s, generator=g, dtype=torch.float64).float() for s in shapes * 2)
    b = max(bq, bk)
    wo, wt = (torch.randn(b, 2, 9, 5, generator=g, dtype=torch.float64) for _ in range(2))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    expanded = [x.expand(b, *x.shape[1:]) for x in leaves]
    (ro, rto), _ = ref_grads(*(x.detach() for x in expanded), wo, wt)
    rgrads = torch.autograd.grad(loss_on_outputs(*torch.func.jvp(
        lambda a, c, d: ref_attention(a, c, d), tuple(x.double() for x in expanded[:3]),
        tuple(x.double() for x in expanded[3:])), wo, wt), leaves)
    with on_backend(backend):
        o, to = fk.attention_jvp(*leaves)
        o2, to2 = torch.func.jvp(fk.attention, (q, k, v), (tq, tk, tv))
    for got, want in ((o, ro), (to, rto), (o2, ro), (to2, rto)):
        assert got.shape == want.shape and rel_err(got, want) < 1e-5
    assert rel_err(o, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) < 1e-5
    loss_on_outputs(o, to, wo, wt).backward()
    for x, r in zip(leaves, rgrads):
        assert x.grad.shape == x.shape and rel_err(x.grad, r) < 5e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_saturated_softmax_backward_through_the_tangent(backend, seed):
    """Logits of ~1e4 (float32): the softmax is one-hot and tS ~ 1e4. The backward through (O, tO) takes dP's
    tangent part as (G V^T - c)(tS - mu), two factors that vanish on the kept key; the expanded form
    G V^T (tS - mu) - c tS + mu c cancelled terms of size |tS| and put errors of 2-300 into dK, where the true
    dK is ~1e-4. Bound: |Q| eps-sized (the float32 error of dS, times Q in dK = s dS^T Q; ~1e-2 here)."""
    q, k, v, tq, tk, tv = _qkv(torch.float64, b=1, hq=2, hkv=2, lq=9, lk=11, d=16, dv=16, seed=seed) + \
        _qkv(torch.float64, b=1, hq=2, hkv=2, lq=9, lk=11, d=16, dv=16, seed=seed + 10)
    q = q * 1e4
    g = torch.Generator().manual_seed(seed)
    wo, wt = (torch.randn(1, 2, 9, 16, generator=g, dtype=torch.float64) for _ in range(2))
    _, ref = ref_grads(q, k, v, tq, tk, tv, wo, wt)
    leaves = [x.float().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    with on_backend(backend):
        o, to = fk.attention_jvp(*leaves)
    loss_on_outputs(o, to, wo, wt).backward()
    for name, x, r in zip(("q", "k", "v", "tq", "tk", "tv"), leaves, ref):
        err = (x.grad.double() - r).abs().max()
        assert err < 2e-6 * q.abs().max() * (1 + r.abs().max()), (name, err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, mul", [(1e3, 1.0), (None, 30.0)], ids=["scale-1e3", "logits-x900"])
def test_sharp_softmax_tangent_has_no_cancellation(backend, scale, mul):
    """A near one-hot softmax has tS ~ 1e3 while tO stays O(1): the streaming tangent is accumulated around the
    running mean of tS (no tacc / l - mu O difference of large terms), so float32 tO keeps float32 accuracy
    (the uncentred form lost 1.7e-4 here)."""
    q, k, v, tq, tk, tv = (x.float() for x in _qkv(torch.float64, b=1, hq=2, hkv=2, lq=37, lk=37, d=16, dv=16)
                           + _qkv(torch.float64, b=1, hq=2, hkv=2, lq=37, lk=37, d=16, dv=16, seed=1))
    q, k = q * mul, k * mul
    ro, rto = ref_jvp(q, k, v, tq, tk, tv, scale=scale)
    with on_backend(backend):
        o, to = fk.attention_jvp(q, k, v, tq, tk, tv, scale=scale)
    assert rel_err(o, ro) < 2.5e-6 and rel_err(to, rto) < 2.5e-6
