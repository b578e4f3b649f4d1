"""torch.func.vmap (and the transforms built on it: jacrev, jacfwd, hessian, per-sample gradients) over
attention and attention_jvp on every backend, against loops and the float64 reference; vmap of
scaled_dot_product_attention under patch_sdpa.

The autograd.Functions fold the vmapped dim into the batch dim (autograd.py ``_vmap_rule``); the mask may be
vmapped, shared, or carry its own batch dim. float64 on the PyTorch backends, float32 on Triton (interpreter).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, hessian, jacfwd, jacrev, vmap

import flowmap_kernels as fk
from flowmap_kernels.integrations import sdpa_patch
from tests.attention.backend_env import BACKENDS, on_backend
from tests.numerics import TOLERANCE, rel_err
from tests.reference import loss_on_outputs, ref_attention, ref_grads

N, B, HQ, HKV, LQ, LK, D, DV = 3, 2, 4, 2, 5, 7, 8, 6


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


def _tol(backend):
    return TOLERANCE[_dtype(backend)]


def _draw(*shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]


def _qkv(n, dtype, seed=0):
    """n examples of (q, k, v, tq, tk, tv), each (n, B, H, L, D)."""
    return _draw((n, B, HQ, LQ, D), (n, B, HKV, LK, D), (n, B, HKV, LK, DV),
                 (n, B, HQ, LQ, D), (n, B, HKV, LK, D), (n, B, HKV, LK, DV), dtype=dtype, seed=seed)


def _mask(kind, n, dtype, seed=1):
    """(mask, in_dim): vmapped float (n, Lq, Lk), vmapped bool with a batch dim (n, B, 1, Lq, Lk) and every row
    alive, shared with its own batch dim (B, 1, Lq, Lk), or None."""
    g = torch.Generator().manual_seed(seed)
    if kind == "vmapped_float":
        return torch.randn(n, LQ, LK, generator=g, dtype=torch.float64).to(dtype), 0
    if kind == "vmapped_bool":
        m = torch.rand(n, B, 1, LQ, LK, generator=g) > 0.4
        m[..., 0] = True
        return m, 0
    if kind == "shared_batched":
        return torch.rand(B, 1, LQ, LK, generator=g) > 0.4, None
    return None, None


MASKS = [None, "vmapped_float", "vmapped_bool", "shared_batched"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_attention_equals_loop(backend, mask_kind):
    dtype = _dtype(backend)
    q, k, v, *_ = _qkv(N, dtype)
    mask, mdim = _mask(mask_kind, N, dtype)
    kv_shared = mask_kind == "shared_batched"  # k, v unbatched (in_dims None) in this case
    k0, v0 = k[0], v[0]

    def f(q, k, v, m):
        return fk.attention(q, k, v, attn_mask=m, enable_gqa=True)

    with on_backend(backend):
        if kv_shared:
            out = vmap(f, in_dims=(0, None, None, mdim))(q, k0, v0, mask)
        else:
            out = vmap(f, in_dims=(0, 0, 0, mdim))(q, k, v, mask)
        loop = torch.stack([f(q[i], k0 if kv_shared else k[i], v0 if kv_shared else v[i],
                              None if mask is None else (mask if mdim is None else mask[i])) for i in range(N)])
    assert out.shape == (N, B, HQ, LQ, DV) and out.dtype == dtype
    assert rel_err(out, loop) < _tol(backend)
    for i in range(N):
        m = None if mask is None else (mask if mdim is None else mask[i])
        ref = ref_attention(q[i], k0 if kv_shared else k[i], v0 if kv_shared else v[i], attn_mask=m)
        assert rel_err(out[i], ref) < _tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_a_non_leading_dim_and_nested(backend):
    dtype = _dtype(backend)
    q, k, v, *_ = _qkv(N, dtype)
    with on_backend(backend):
        out = vmap(lambda a, b, c: fk.attention(a, b, c, enable_gqa=True), in_dims=(2, 0, 0), out_dims=1)(
            q.movedim(0, 2), k, v)
        nested = vmap(vmap(lambda a, b, c: fk.attention(a, b, c, is_causal=True, enable_gqa=True)))(
            q.reshape(1, N, B, HQ, LQ, D), k.reshape(1, N, B, HKV, LK, D), v.reshape(1, N, B, HKV, LK, DV))
    for i in range(N):
        assert rel_err(out[:, i], ref_attention(q[i], k[i], v[i])) < _tol(backend)
        assert rel_err(nested[0, i], ref_attention(q[i], k[i], v[i], is_causal=True)) < _tol(backend)


@pytest.mark.parametrize("entry", ["attention_jvp", "func_jvp"])
@pytest.mark.parametrize("mask_kind", [None, "vmapped_float"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_jvp_and_its_gradients(backend, mask_kind, entry):
    """vmap over the fused (O, tO) pass, and autograd through it to all six inputs (backward through the
    tangent, vmapped): equals the float64 reference per example."""
    dtype = _dtype(backend)
    xs = [x.requires_grad_() for x in _qkv(N, dtype, seed=2)]
    mask, mdim = _mask(mask_kind, N, dtype)

    def one(q, k, v, tq, tk, tv, m):
        if entry == "attention_jvp":
            return fk.attention_jvp(q, k, v, tq, tk, tv, attn_mask=m, enable_gqa=True)
        return torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, attn_mask=m, enable_gqa=True), (q, k, v),
                              (tq, tk, tv))

    with on_backend(backend):
        o, to = vmap(one, in_dims=(0,) * 6 + (mdim,))(*xs, mask)
    g = torch.Generator().manual_seed(9)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64)
    wt = torch.randn(o.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), xs)
    for i in range(N):
        m = None if mask is None else mask[i]
        (ro, rto), rg = ref_grads(*(x[i] for x in xs), wo[i], wt[i], attn_mask=m)
        assert rel_err(o[i], ro) < _tol(backend) and rel_err(to[i], rto) < _tol(backend)
        for gx, r in zip(grads, rg):
            assert rel_err(gx[i], r) < 10 * _tol(backend)


@pytest.mark.parametrize("per_example_dims", [4, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_vmap_and_its_gradients(backend, per_example_dims):
    """torch.func.jvp over a vmapped attention (the other nesting: the dual lies below the batch level, so
    the autograd.Function's vmap and jvp rules carry it), per-example inputs 4-d or SDPA's 3-d, and autograd
    through the tangent: equals the float64 reference per example."""
    dtype = _dtype(backend)
    xs = [x.requires_grad_() for x in _qkv(N, dtype, seed=4)]
    if per_example_dims == 3:
        xs = [x.detach()[:, 0].requires_grad_() for x in xs]  # (n, heads, tokens, dim)
    with on_backend(backend):
        o, to = torch.func.jvp(lambda a, b, c: vmap(lambda *y: fk.attention(*y, enable_gqa=True))(a, b, c),
                               tuple(xs[:3]), tuple(xs[3:]))
    g = torch.Generator().manual_seed(10)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64)
    wt = torch.randn(o.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), xs)
    four = (lambda x: x[None]) if per_example_dims == 3 else (lambda x: x)  # noqa: E731
    for i in range(N):
        (ro, rto), rg = ref_grads(*(four(x[i]) for x in xs), four(wo[i]), four(wt[i]), enable_gqa=True)
        assert rel_err(o[i], ro.reshape(o[i].shape)) < _tol(backend)
        assert rel_err(to[i], rto.reshape(o[i].shape)) < _tol(backend)
        for gx, r in zip(grads, rg):
            assert rel_err(gx[i], r.reshape(gx[i].shape)) < 10 * _tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_vmap_with_shared_key_value(backend):
    """jvp of vmap where only the queries are vmapped and the keys / values (with their tangents) are shared:
    every tangent reaches the result."""
    dtype = _dtype(backend)
    q, _, _, tq, _, _ = _qkv(N, dtype, seed=5)
    k, v, tk, tv = _draw((B, HKV, LK, D), (B, HKV, LK, DV), (B, HKV, LK, D), (B, HKV, LK, DV), dtype=dtype, seed=6)
    with on_backend(backend):
        o, to = torch.func.jvp(lambda a, b, c: vmap(lambda y: fk.attention(y, b, c, enable_gqa=True))(a),
                               (q, k, v), (tq, tk, tv))
    for i in range(N):
        ro, rto = torch.func.jvp(lambda a, b, c: ref_attention(a, b, c, enable_gqa=True),
                                 (q[i].double(), k.double(), v.double()), (tq[i].double(), tk.double(), tv.double()))
        assert rel_err(o[i], ro) < _tol(backend) and rel_err(to[i], rto) < _tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_jacfwd_hessian_match_float64_reference(backend):
    dtype = _dtype(backend)
    q, k, v = _draw((1, 2, 3, 4), (1, 1, 5, 4), (1, 1, 5, 3), dtype=dtype, seed=3)
    mask = torch.tensor([[True] * 4 + [False]] * 3)

    def f(q, k, v):
        return fk.attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def ref(q, k, v):
        return ref_attention(q, k, v, attn_mask=mask)

    p64 = [x.double() for x in (q, k, v)]
    with on_backend(backend):
        jr = jacrev(f, argnums=(0, 1, 2))(q, k, v)
        jf = jacfwd(f, argnums=(0, 1, 2))(q, k, v)
        scalar = lambda a: f(a, k, v).sin().sum()  # noqa: E731
        h_fr = hessian(scalar)(q)  # forward over reverse
        h_rr = jacrev(jacrev(scalar))(q)  # reverse over reverse
    want = jacrev(ref, argnums=(0, 1, 2))(*p64)
    for a, b, w in zip(jr, jf, want):
        assert rel_err(a, w) < 10 * _tol(backend) and rel_err(b, w) < 10 * _tol(backend)
    h_ref = hessian(lambda a: ref(a, *p64[1:]).sin().sum())(p64[0])
    assert h_ref.abs().max() > 0
    assert rel_err(h_fr, h_ref) < 10 * _tol(backend) and rel_err(h_rr, h_ref) < 10 * _tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend):
    """Per-example gradients of shared key/value tensors (the pattern of per-sample-gradient training):
    vmap(grad) with unbatched k, v equals one autograd.grad per example."""
    dtype = _dtype(backend)
    q, *_ = _qkv(N, dtype, seed=4)
    k, v, w = _draw((B, HKV, LK, D), (B, HKV, LK, DV), (N, B, HQ, LQ, DV), dtype=dtype, seed=5)

    def loss(k, v, q, w):
        return (fk.attention(q, k, v, is_causal=True, enable_gqa=True) * w).square().sum()

    with on_backend(backend):
        dk, dv = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(k, v, q, w)
    for i in range(N):
        kk, vv = k.double().requires_grad_(), v.double().requires_grad_()
        ref = torch.autograd.grad((ref_attention(q[i], kk, vv, is_causal=True) * w[i].double()).square().sum(),
                                  (kk, vv))
        assert rel_err(dk[i], ref[0]) < 10 * _tol(backend) and rel_err(dv[i], ref[1]) < 10 * _tol(backend)


def test_vmap_of_sdpa_under_patch_sdpa():
    """vmap of scaled_dot_product_attention works unpatched; inside patch_sdpa it runs fk.attention (no
    fallback) with the same result, and jacfwd through it (forward mode, which the builtin lacks) works."""
    q, k, v, *_ = _qkv(N, torch.float64, seed=6)
    mask = _mask("vmapped_bool", N, torch.float64)[0]
    sdpa = lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m, enable_gqa=True)  # noqa: E731
    want = vmap(sdpa)(q, k, v, mask)
    sdpa_patch.reset_fallbacks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdpa_patch.SDPAFallbackWarning)
        with fk.patch_sdpa(), fk.use_backend("torch"):
            got = vmap(sdpa)(q, k, v, mask)
            jac = vmap(jacfwd(sdpa))(q, k, v, mask)
    assert sdpa_patch.fallback_counts() == {}
    assert rel_err(got, want) < 1e-12
    for i in range(N):
        ref = jacrev(lambda a: ref_attention(a, k[i], v[i], attn_mask=mask[i]))(q[i])
        assert rel_err(jac[i], ref) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_the_mask_only(backend):
    """Only the mask is vmapped (one mask per example, shared q, k, v): the inputs are expanded."""
    dtype = _dtype(backend)
    q, k, v, *_ = _qkv(1, dtype, seed=7)
    masks = _mask("vmapped_float", N, dtype)[0]
    with on_backend(backend):
        out = vmap(lambda m: fk.attention(q[0], k[0], v[0], attn_mask=m, enable_gqa=True))(masks)
    for i in range(N):
        assert rel_err(out[i], ref_attention(q[0], k[0], v[0], attn_mask=masks[i])) < _tol(backend)
