"""Bad input gets a clear error naming the argument."""
import math

import pytest
import torch

import flowmap_kernels as fk


def _qkv(dtype=torch.float32, hq=2, hkv=2, lq=5, lk=7, d=8, dv=8):
    return (torch.randn(1, hq, lq, d, dtype=dtype), torch.randn(1, hkv, lk, d, dtype=dtype),
            torch.randn(1, hkv, lk, dv, dtype=dtype))


def _call(q, k, v, **kw):
    return fk.attention(q, k, v, **kw)


@pytest.mark.parametrize("mutate, kw, exc, pattern", [
    (lambda q, k, v: (q, k.double(), v), {}, ValueError, r"key: dtype torch.float64 does not match query"),
    (lambda q, k, v: (q, k, v.half()), {}, ValueError, r"value: dtype"),
    (lambda q, k, v: (q.int(), k, v), {}, ValueError, r"query: expected dtype float16, bfloat16, float32 or float64"),
    (lambda q, k, v: (q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}, ValueError, r"query: expected 4 dims"),
    (lambda q, k, v: (q[0, 0], k[0, 0], v[0, 0]), {"attn_mask": torch.ones(1, 5, 7, dtype=torch.bool)}, ValueError,
     r"attn_mask: expected at most 2 dims \(tokens, keys\) with 2-d query"),
    (lambda q, k, v: (q, k, v[0, 0, 0]), {}, ValueError, r"value: expected at least 2 dims"),
    (lambda q, k, v: (q[None].expand(2, *q.shape), k[None].expand(3, *k.shape), v), {}, ValueError,
     r"key: leading dims \(3, 1\) do not broadcast with query's \(2, 1\)"),
    (lambda q, k, v: (q[None], k[None], v[None].expand(2, *v.shape)[:, :, :, :1]), {}, ValueError,
     r"value: heads and tokens"),
    (lambda q, k, v: (q[None], k[None], v[None]), {"attn_mask": torch.ones(1, 1, 1, 1, 5, 7, dtype=torch.bool)},
     ValueError, r"attn_mask: expected at most 5 dims"),
    (lambda q, k, v: (q[None], k[None], v[None]), {"attn_mask": torch.ones(3, 1, 1, 5, 7, dtype=torch.bool)},
     ValueError, r"attn_mask: leading dims \(3, 1\) do not broadcast"),
    (lambda q, k, v: (q, k[..., :4], v), {}, ValueError, r"key: head_dim 4 does not match query head_dim 8"),
    (lambda q, k, v: (q, k, v[:, :, :3]), {}, ValueError, r"value: heads and tokens"),
    (lambda q, k, v: (torch.cat([q, q], 1), k, v), {}, ValueError, r"key: 2 heads differ from query's 4; pass "
                                                                      r"enable_gqa=True"),
    (lambda q, k, v: (q, k, v), {"dropout_p": 0.1}, ValueError, r"dropout_p: only 0.0"),
    (lambda q, k, v: (q, k, v), {"dropout_p": torch.tensor(0.1)}, ValueError, r"dropout_p: only 0.0 .*got 0.1"),
    (lambda q, k, v: (q, k, v), {"dropout_p": "0"}, ValueError, r"dropout_p: only 0.0"),
    (lambda q, k, v: (q, k, v), {"scale": float("nan")}, ValueError, r"scale: expected a finite number"),
    (lambda q, k, v: (q, k, v), {"scale": math.inf}, ValueError, r"scale: expected a finite number"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(3, 7, dtype=torch.bool)}, ValueError,
     r"attn_mask: shape \(3, 7\) is not broadcastable"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.int32)}, ValueError,
     r"attn_mask: expected dtype bool, float32 or the query dtype"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.bool), "is_causal": True},
     ValueError, r"attn_mask: cannot be combined with is_causal"),
    (lambda q, k, v: ([1.0], k, v), {}, TypeError, r"query: expected a torch.Tensor"),
])
def test_bad_input_names_the_argument(mutate, kw, exc, pattern):
    q, k, v = mutate(*_qkv())
    with pytest.raises(exc, match=pattern):
        _call(q, k, v, **kw)


def test_gqa_heads_must_divide():
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match=r"query: heads \(3\) must be a multiple of key/value heads \(2\)"):
        fk.attention(q, k, v, enable_gqa=True)


def test_device_mismatch_is_named():
    q, k, v = _qkv()
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match=r"key: device meta does not match query device cpu"):
        fk.attention(q, meta_k, v)


def test_tangent_shape_is_checked():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"tangent of key: expected shape \(1, 2, 7, 8\)"):
        fk.attention_jvp(q, k, v, torch.zeros_like(q), torch.zeros(1, 2, 6, 8), torch.zeros_like(v))
    with pytest.raises(ValueError, match=r"tangent of value: expected dtype torch.float32 \(the dtype of value\)"):
        fk.attention_jvp(q, k, v, None, None, v.double())


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_none_tangents_mean_zero(backend):
    q, k, v = _qkv(dtype=torch.float64)
    tv = torch.randn_like(v)
    with fk.use_backend(backend):
        o1, to1 = fk.attention_jvp(q, k, v, None, None, tv)
        o2, to2 = fk.attention_jvp(q, k, v, torch.zeros_like(q), torch.zeros_like(k), tv)
    assert torch.allclose(o1, o2) and torch.allclose(to1, to2)


def test_zero_dropout_as_a_tensor_is_accepted():
    """SDPA reads a 0-d dropout_p tensor as its value."""
    q, k, v = _qkv()
    assert torch.equal(fk.attention(q, k, v, dropout_p=torch.tensor(0.0)), fk.attention(q, k, v))
