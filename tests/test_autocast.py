"""torch.autocast: attention and the fused DiT ops follow SDPA's / F.linear's autocast policy.

Inside an autocast region, floating inputs other than float64 are cast to the autocast dtype (mixed inputs
too, e.g. a QK-normed float32 query with a bfloat16 value), the result is in that dtype, and the kernels
accumulate in float32 inside (autocast does not lower their tile math). Checked against the same call on
inputs cast by hand, outside autocast (bitwise), and against float64 references (bfloat16 tolerance); JVP and
backward through the tangent included; the patched SDPA under autocast with mixed dtypes is served.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flowmap_kernels as fk
from flowmap_kernels.integrations import fallback_counts, patch_sdpa, reset_fallbacks
from tests.numerics import rel_err, tolerance
from tests.reference import ref_attention, ref_jvp

BF16 = torch.bfloat16


def _qkv(seed=0, mixed=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 19, 16, generator=g) for _ in range(3))
    return q, k, (v.to(BF16) if mixed else v)  # float32 q, k (after a float32 QK-norm) and a bfloat16 value


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_attention_under_autocast_equals_the_cast_call(backend):
    q, k, v = _qkv()
    mask = torch.randn(19, 19)
    with fk.use_backend(backend):
        with torch.autocast("cpu", dtype=BF16):
            o = fk.attention(q, k, v, attn_mask=mask)
        want = fk.attention(q.to(BF16), k.to(BF16), v, attn_mask=mask.to(BF16))
    assert o.dtype == BF16 and torch.equal(o, want)
    ref = ref_attention(q.to(BF16), k.to(BF16), v, attn_mask=mask.to(BF16))
    assert rel_err(o, ref) < tolerance(BF16)


def test_attention_jvp_and_backward_under_autocast():
    q, k, v = _qkv(1)
    tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    with fk.use_backend("torch"), torch.autocast("cpu", dtype=BF16):
        o, to = torch.func.jvp(fk.attention, tuple(leaves), (tq, tk, tv))
        o2, to2 = fk.attention_jvp(*leaves, tq, tk, tv)
    assert o.dtype == to.dtype == BF16 and torch.equal(o, o2) and torch.equal(to, to2)
    (o.float().square().sum() + to.float().square().sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == x.dtype and torch.isfinite(x.grad).all() for x in leaves)
    cast = [x.to(BF16) for x in (q, k, v, tq, tk, tv)]
    ro, rto = ref_jvp(*cast)
    assert rel_err(o, ro) < tolerance(BF16) and rel_err(to, rto) < tolerance(BF16)


def test_autocast_keeps_the_tile_math_in_float32():
    """The blockwise backend's float32 tiles are not lowered by autocast: same result as outside it."""
    q, k, v = (x.to(BF16) for x in _qkv(2, mixed=False))
    with fk.use_backend("torch"):
        want = fk.attention(q, k, v)
        with torch.autocast("cpu", dtype=BF16):
            got = fk.attention(q, k, v)
    assert torch.equal(got, want)


def test_float64_is_not_cast():
    q, k, v = (x.double() for x in _qkv(3, mixed=False))
    with torch.autocast("cpu", dtype=BF16):
        o = fk.attention(q, k, v)
    assert o.dtype == torch.float64


def test_patched_sdpa_with_mixed_dtypes_under_autocast():
    """A QK-normed float32 query/key with a bfloat16 value under autocast (SDPA casts them): served, JVP works."""
    q, k, v = _qkv(4)
    tq = torch.randn_like(q)
    reset_fallbacks()
    with patch_sdpa(), torch.autocast("cpu", dtype=BF16):
        o, to = torch.func.jvp(lambda x: F.scaled_dot_product_attention(x, k, v), (q,), (tq,))
    assert fallback_counts() == {} and o.dtype == BF16
    with fk.use_backend("naive"):
        want = fk.attention_jvp(q.to(BF16), k.to(BF16), v, tq.to(BF16), None, None)
    assert rel_err(o, want[0]) < tolerance(BF16) and rel_err(to, want[1]) < tolerance(BF16)


@pytest.mark.parametrize("op,args", [
    ("modulated_layer_norm", lambda x, p: (x, p, p * 0.5)),
    ("rms_norm", lambda x, p: (x, p[0, 0])),
    ("gelu_tanh", lambda x, p: (x,)),
    ("gated_residual", lambda x, p: (x, p, x.to(BF16))),
    ("linear", lambda x, p: (x, torch.randn(8, 16), torch.randn(8))),
])
def test_fused_ops_under_autocast_equal_the_cast_call(op, args):
    g = torch.Generator().manual_seed(5)
    x, p = torch.randn(2, 7, 16, generator=g), torch.randn(2, 1, 16, generator=g)
    a = args(x, p)
    fn = getattr(fk.ops, op)
    with torch.autocast("cpu", dtype=BF16):
        y = fn(*a)
        tx = torch.randn_like(x)
        yj, ty = torch.func.jvp(lambda z: fn(z, *a[1:]), (x,), (tx,))
    want = fn(*(t.to(BF16) for t in a))
    assert y.dtype == BF16 and torch.equal(y, want)
    wj, wt = torch.func.jvp(lambda z: fn(z, *(t.to(BF16) for t in a[1:])), (x.to(BF16),), (tx.to(BF16),))
    assert torch.equal(yj, wj) and torch.equal(ty, wt)


def test_layer_norm_follows_f_layer_norm_autocast_policy():
    """ops.layer_norm keeps F.layer_norm's autocast policy: float32 on the devices whose autocast runs
    layer_norm in float32 (CUDA), the inputs' dtype on CPU (PyTorch 2.13 leaves it out of CPU autocast)."""
    from flowmap_kernels._autodiff import autocasts_to_float32
    assert autocasts_to_float32("layer_norm", "cuda") and not autocasts_to_float32("layer_norm", "cpu")
    g = torch.Generator().manual_seed(6)
    x, w, b, tx = (torch.randn(*s, generator=g) for s in ((2, 7, 16), (16,), (16,), (2, 7, 16)))
    with torch.autocast("cpu", dtype=BF16):
        y = fk.ops.layer_norm(x, w, b)
        yj, ty = torch.func.jvp(lambda z: fk.ops.layer_norm(z, w, b), (x,), (tx,))
        want = F.layer_norm(x, (16,), w, b)
    assert y.dtype == want.dtype == torch.float32 and torch.equal(y, fk.ops.layer_norm(x, w, b))
    assert torch.equal(yj, y) and ty.dtype == torch.float32


def test_package_dit_under_autocast():
    """The package's DiT (QK-norm: float32 weights meet bfloat16 activations) under autocast: forward, both JVP
    routes and the backward through the tangent run, agree with each other, and stay within bfloat16 rounding
    of the float32 model (bound 3e-2: every layer's inputs rounded to bfloat16, u = 3.9e-3, through two
    blocks; measured 7e-3 for y and 8e-3 for the tangent)."""
    from flowmap_kernels.nn.dit import DiT
    torch.manual_seed(0)
    model = DiT(qk_norm=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # no zero-initialised (adaLN-Zero) layer: every output and gradient nonzero
    x, s, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.rand(2), torch.randint(0, 10, (2,))
    args, tans = (x, s, t), (torch.randn_like(x), torch.zeros_like(s), torch.ones_like(t))

    def f(x, s, t):
        return model(x, s, t, y)
    ref = fk.func.jvp(f, args, tans)
    with torch.autocast("cpu", dtype=BF16):
        o, to = fk.func.jvp(f, args, tans)
        o2, to2 = torch.func.jvp(f, args, tans)
    assert o.dtype == to.dtype == BF16
    assert torch.equal(o, o2) and torch.equal(to, to2)
    assert rel_err(o, ref[0]) < 3e-2 and rel_err(to, ref[1]) < 3e-2
    (o.float().square().mean() + to.float().square().mean()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_varlen_under_autocast_equals_the_cast_call():
    g = torch.Generator().manual_seed(8)
    q, k, v, tq = (torch.randn(20, 2, 8, generator=g) for _ in range(4))
    v = v.to(BF16)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    with fk.use_backend("torch"):
        with torch.autocast("cpu", dtype=BF16):
            o = fk.attention_varlen(q, k, v, cu, cu)
            o2, to2 = fk.attention_varlen_jvp(q, k, v, tq, None, None, cu, cu)
        want = fk.attention_varlen(q.to(BF16), k.to(BF16), v, cu, cu)
        want2 = fk.attention_varlen_jvp(q.to(BF16), k.to(BF16), v, tq.to(BF16), None, None, cu, cu)
    assert o.dtype == BF16 and torch.equal(o, want)
    assert torch.equal(o2, want2[0]) and torch.equal(to2, want2[1])
