"""patch_sdpa / install / uninstall: routing, exactness, fallbacks with one warning, restore, nesting, threads."""
from __future__ import annotations

import math
import sys
import threading
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmap_kernels.integrations import (
    SDPAFallbackWarning, fallback_counts, install, is_installed, patch_sdpa, reset_fallbacks, uninstall,
)
from flowmap_kernels.integrations import _patching
from tests.integrations.helpers import TinySDPAModel, max_rel_err, patched_and_reference
from tests.numerics import rel_err
from tests.reference import ref_attention

ORIGINAL = F.scaled_dot_product_attention
ORIGINAL_C = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean_state():
    reset_fallbacks()
    yield
    leaked = is_installed()
    while _patching.patches:  # never leak a patch into other tests, even after a failure
        p = _patching.patches.popitem()[1]
        setattr(p.namespace, p.name, p.original)
    assert not leaked, "a test left the patch installed"
    assert F.scaled_dot_product_attention is ORIGINAL
    assert torch._C._nn.scaled_dot_product_attention is ORIGINAL_C


def _qkv(B=2, Hq=4, Hkv=4, Lq=7, Lk=7, D=8, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv or D, generator=g, dtype=dtype)
    return q, k, v


def _is_router(fn) -> bool:
    return getattr(fn, "_flowmap_router", False)


# ------------------------------------------------------------------------------------ routing is exact

CASES = {
    "plain": dict(),
    "causal-Lq<Lk": dict(Lq=5, Lk=9, kw=dict(is_causal=True)),
    "gqa-scale": dict(Hq=4, Hkv=2, kw=dict(enable_gqa=True, scale=0.3)),
    "bool-mask": dict(Lq=6, Lk=10, mask="bool"),
    "float-mask-Dv": dict(Lq=6, Lk=10, Dv=5, mask="float"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_routed_calls_match_float64_reference_and_take_no_fallback(name):
    c = dict(CASES[name])
    kw, mask = c.pop("kw", {}), c.pop("mask", None)
    q, k, v = _qkv(**c)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(1, 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(3)) > 0.3
    elif mask == "float":
        kw["attn_mask"] = torch.randn(q.shape[0], 1, q.shape[2], k.shape[2], dtype=q.dtype)
    tq, tk, tv = _qkv(**c, seed=1)
    with patch_sdpa():
        assert _is_router(F.scaled_dot_product_attention)
        o, to = torch.func.jvp(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, **kw), (q, k, v), (tq, tk, tv))
    ro, rto = torch.func.jvp(lambda a, b, d: ref_attention(a, b, d, **kw), (q, k, v), (tq, tk, tv))
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    assert fallback_counts() == {}


def test_three_dim_inputs_are_served_as_a_batch_of_one():
    q, k, v = (x[0] for x in _qkv(Lq=5, Lk=6))
    mask = torch.randn(4, 5, 6, dtype=q.dtype)
    tq, tk, tv = (x[0] for x in _qkv(Lq=5, Lk=6, seed=1))
    with patch_sdpa():
        o, to = torch.func.jvp(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, attn_mask=mask),
                               (q, k, v), (tq, tk, tv))
    assert o.shape == (4, 5, 8)
    ro, rto = torch.func.jvp(lambda a, b, d: ref_attention(a[None], b[None], d[None], attn_mask=mask[None])[0],
                             (q, k, v), (tq, tk, tv))
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    assert fallback_counts() == {}


def test_five_dim_inputs_flatten_their_leading_dims():
    """(N, T, heads, tokens, dim) as video models call SDPA, with a mask broadcast over N."""
    q, k, v = (x.reshape(2, 2, 2, *x.shape[2:]) for x in _qkv(Lq=5, Lk=6))
    tq, tk, tv = (x.reshape(2, 2, 2, *x.shape[2:]) for x in _qkv(Lq=5, Lk=6, seed=1))
    mask = torch.randn(2, 1, 5, 6, dtype=q.dtype)
    with patch_sdpa():
        o, to = torch.func.jvp(lambda a, b, d: F.scaled_dot_product_attention(a, b, d, attn_mask=mask),
                               (q, k, v), (tq, tk, tv))
    assert o.shape == (2, 2, 2, 5, 8)
    flat = lambda x: x.reshape(4, *x.shape[2:])  # noqa: E731
    ro, rto = torch.func.jvp(lambda a, b, d: ref_attention(flat(a), flat(b), flat(d),
                                                           attn_mask=flat(mask.expand(2, 2, 2, 5, 6))),
                             (q, k, v), (tq, tk, tv))
    assert rel_err(o, ro.reshape(o.shape)) < 1e-12 and rel_err(to, rto.reshape(o.shape)) < 1e-12
    assert fallback_counts() == {}


def test_unpatched_jvp_raises_and_patched_jvp_works():
    q, k, v = _qkv(dtype=torch.float32)
    t = _qkv(dtype=torch.float32, seed=1)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), t)
    with patch_sdpa():
        torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), t)


def test_multihead_attention_module_is_routed():
    """nn.MultiheadAttention's Python path looks the name up in torch.nn.functional at call time."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    x, tx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    fn = lambda a: mha(a, a, a, need_weights=False)[0]  # noqa: E731
    with pytest.raises(NotImplementedError):
        torch.func.jvp(fn, (x,), (tx,))
    with patch_sdpa():
        o, to = torch.func.jvp(fn, (x,), (tx,))
    ro, rto = _math_jvp(fn, x, tx)
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12


def _math_jvp(fn, x, tx):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(fn, (x,), (tx,))


@pytest.mark.parametrize("dtype", [torch.float32])
def test_tiny_model_jvp_and_tangent_loss_gradients_match_sdpa_math(dtype):
    torch.manual_seed(0)
    model = TinySDPAModel().to(dtype).eval()
    x, tx = torch.randn(2, 11, 24, dtype=dtype), torch.randn(2, 11, 24, dtype=dtype)
    mask = torch.ones(2, 1, 11, 11, dtype=torch.bool)
    mask[1, :, :, 8:] = False  # padding of the second sequence
    params = list(model.parameters())
    fn = lambda a: model(a, mask)  # noqa: E731
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(fn, (x,), (tx,))
    assert max_rel_err(*patched_and_reference(fn, params, (x,), (tx,))) < 1e-5


# ------------------------------------------------------------------------------- fallbacks and warnings

def _fallback_cases():
    q, k, v = _qkv(dtype=torch.float32)
    m = torch.zeros(1, 1, 7, 7, dtype=torch.float32)
    return {
        "dropout_p": (dict(dropout_p=0.25), (q, k, v)),
        # a float16 mask with float32 inputs: SDPA's own error (fk.attention refuses it too)
        "ValueError:attn_mask": (dict(attn_mask=m.half()), (q, k, v)),
    }


@pytest.mark.parametrize("reason", ["dropout_p"])
def test_fallback_gives_the_original_result_and_warns_once_per_reason(reason):
    kw, (q, k, v) = _fallback_cases()[reason]
    torch.manual_seed(7)
    want = ORIGINAL(q, k, v, **kw)
    with patch_sdpa(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = []
        for _ in range(3):
            torch.manual_seed(7)  # the same dropout mask as the original call
            outs.append(F.scaled_dot_product_attention(q, k, v, **kw))
    mine = [w for w in rec if issubclass(w.category, SDPAFallbackWarning)]
    assert len(mine) == 1, [str(w.message) for w in rec]
    assert fallback_counts() == {reason: 3}
    for o in outs:
        assert torch.equal(o, want)


def test_sdpa_error_cases_fall_back_to_the_original_error():
    kw, (q, k, v) = _fallback_cases()["ValueError:attn_mask"]
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        ORIGINAL(q, k, v, **kw)
    with patch_sdpa(), pytest.warns(SDPAFallbackWarning), pytest.raises(RuntimeError, match="attn_mask dtype"):
        F.scaled_dot_product_attention(q, k, v, **kw)
    assert fallback_counts() == {"ValueError:attn_mask": 1}


def test_float32_mask_with_half_inputs_and_a_shared_key_batch_are_served():
    """What SDPA accepts beyond fk.attention's 4-d contract is served, not fallen back: a float32 mask with
    float16 inputs, a key / value batch of 1 (broadcast over the query batch), 3-d key / value with 4-d
    query, and leading dims that broadcast."""
    q, k, v = _qkv(dtype=torch.float32)
    m = torch.randn(1, 1, 7, 7)
    cases = [((q.half(), k.half(), v.half()), dict(attn_mask=m)), ((q, k[:1], v[:1]), {}),
             ((q, k[0], v[0]), {}), ((q[:1].expand(3, *q.shape[1:])[:, None].contiguous(), k[None], v[None]), {})]
    for (a, b, c), kw in cases:
        want = ORIGINAL(a.float(), b.float(), c.float(), **kw)
        with patch_sdpa():
            o, to = torch.func.jvp(lambda x: F.scaled_dot_product_attention(x, b, c, **kw), (a,),
                                   (torch.randn_like(a),))
        assert rel_err(o, want) < 1e-3 and torch.isfinite(to).all()
    assert fallback_counts() == {}


def test_distinct_reasons_warn_separately_and_reset_rearms():
    q, k, v = _qkv(dtype=torch.float32)
    with patch_sdpa(), warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        with pytest.raises(RuntimeError, match="attn_mask dtype"):  # the original's error, after its warning
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, 1, 7, 7, dtype=torch.half))
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
        reset_fallbacks()
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert sum(issubclass(w.category, SDPAFallbackWarning) for w in rec) == 3


def test_original_behaviour_is_kept_for_mask_with_causal_and_bad_calls():
    """attn_mask with is_causal: whatever the original does (torch 2.13 on CPU combines both; other
    versions raise), the patched name does. Unknown keywords, missing arguments and a positional scale raise
    TypeError."""
    q, k, v = _qkv(dtype=torch.float32)
    m = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) > 0.3
    try:
        want = ORIGINAL(q, k, v, attn_mask=m, is_causal=True)
    except RuntimeError as e:  # pragma: no cover - depends on the torch version
        want = e
    with patch_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SDPAFallbackWarning)
        if isinstance(want, Exception):  # pragma: no cover
            with pytest.raises(RuntimeError):
                F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
        else:
            assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True), want)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, not_an_argument=1)
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k)
        with pytest.raises(TypeError):  # scale and enable_gqa are keyword-only in SDPA
            F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.3)
    with pytest.raises(TypeError):
        ORIGINAL(q, k, v, None, 0.0, False, 0.3)
    assert fallback_counts() == {"attn_mask+is_causal": 1, "keywords": 1}


def test_nested_tensors_fall_back():
    q = torch.nested.nested_tensor([torch.randn(2, 3, 8), torch.randn(2, 5, 8)], layout=torch.jagged)
    try:
        want = ORIGINAL(q, q, q)
    except Exception as e:  # noqa: BLE001 - whatever the original does, the patch must do the same
        want = e
    with patch_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SDPAFallbackWarning)
        if isinstance(want, Exception):
            with pytest.raises(type(want)):
                F.scaled_dot_product_attention(q, q, q)
        else:
            got = F.scaled_dot_product_attention(q, q, q)
            assert all(torch.equal(a, b) for a, b in zip(got.unbind(), want.unbind()))
    assert fallback_counts() == {"nested": 1}


def test_explicit_backend_that_cannot_run_falls_back(monkeypatch):
    import flowmap_kernels as fk
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else "triton" runs CPU tensors interpreted
    q, k, v = _qkv(dtype=torch.float32)
    want = ORIGINAL(q, k, v)
    with fk.use_backend("triton"), patch_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("ignore", SDPAFallbackWarning)
        got = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(got, want)
    (reason,) = fallback_counts()
    assert reason.startswith("BackendUnavailableError")


def test_reentry_from_a_wrapping_original_does_not_loop():
    """A foreign wrapper installed before us that calls the public name again runs torch's builtin."""
    calls = []

    def foreign(*args, **kwargs):
        calls.append(1)
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)

    q, k, v = _qkv(dtype=torch.float32)
    F.scaled_dot_product_attention = foreign
    try:
        with patch_sdpa(), warnings.catch_warnings():
            warnings.simplefilter("ignore", SDPAFallbackWarning)
            got = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        assert F.scaled_dot_product_attention is foreign
    finally:
        F.scaled_dot_product_attention = ORIGINAL
    assert len(calls) == 1 and got.shape == q.shape


# ---------------------------------------------------------------------- restore, nesting, other targets

def test_context_manager_restores_the_exact_object():
    with patch_sdpa() as p:
        assert isinstance(p, patch_sdpa) and is_installed()
        assert F.scaled_dot_product_attention is not ORIGINAL
        assert torch._C._nn.scaled_dot_product_attention is ORIGINAL_C  # untouched without c_binding
    assert F.scaled_dot_product_attention is ORIGINAL and not is_installed()


def test_restore_after_an_exception_in_the_block():
    with pytest.raises(KeyError):
        with patch_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_nesting_counts_and_reentrant_object():
    p = patch_sdpa()
    with p:
        routed = F.scaled_dot_product_attention
        with p:
            with patch_sdpa():
                assert F.scaled_dot_product_attention is routed  # one router per target, not stacked
            assert F.scaled_dot_product_attention is routed
        assert is_installed()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_install_uninstall_reference_counted_and_unbalanced_uninstall_raises():
    install()
    install()
    uninstall()
    assert is_installed()
    uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL
    with pytest.raises(RuntimeError, match="no matching install"):
        uninstall()


def test_decorator_form():
    @patch_sdpa()
    def f():
        return is_installed()

    assert f() and not is_installed()


def test_c_binding_target():
    q, k, v = _qkv(dtype=torch.float32)
    t = _qkv(dtype=torch.float32, seed=1)
    with patch_sdpa(c_binding=True):
        assert _is_router(torch._C._nn.scaled_dot_product_attention)
        torch.func.jvp(torch._C._nn.scaled_dot_product_attention, (q, k, v), t)
        with patch_sdpa():  # a plain nested patch leaves the C binding alone
            pass
        assert _is_router(torch._C._nn.scaled_dot_product_attention)
    assert torch._C._nn.scaled_dot_product_attention is ORIGINAL_C


def test_modules_that_imported_the_function_by_name():
    mod = types.ModuleType("fk_test_fake_thirdparty")
    exec("from torch.nn.functional import scaled_dot_product_attention\n"
         "from torch.nn.functional import scaled_dot_product_attention as sdpa\n"
         "def attend(q, k, v):\n    return sdpa(q, k, v)\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        q, k, v = _qkv(dtype=torch.float32)
        t = _qkv(dtype=torch.float32, seed=1)
        with patch_sdpa():
            with pytest.raises(NotImplementedError):  # bound at import: not covered by the plain patch
                torch.func.jvp(mod.attend, (q, k, v), t)
        with patch_sdpa(modules=[mod.__name__]):
            assert _is_router(mod.sdpa) and _is_router(mod.scaled_dot_product_attention)
            o, to = torch.func.jvp(mod.attend, (q, k, v), t)
        assert mod.sdpa is ORIGINAL and mod.scaled_dot_product_attention is ORIGINAL
        ro, rto = torch.func.jvp(lambda a, b, d: ref_attention(a, b, d), (q, k, v), t)
        assert rel_err(to, rto) < 1e-5
        with pytest.raises(ValueError, match="no global bound"):
            install(modules=[math])
        with pytest.raises(ValueError, match="not imported"):
            patch_sdpa(modules=["no_such_module_xyz"])
    finally:
        del sys.modules[mod.__name__]


def test_uninstall_leaves_a_foreign_replacement_in_place():
    def foreign(*a, **k):
        return ORIGINAL(*a, **k)

    install()
    F.scaled_dot_product_attention = foreign
    try:
        with pytest.warns(RuntimeWarning, match="replaced by someone else"):
            uninstall()
        assert F.scaled_dot_product_attention is foreign
    finally:
        F.scaled_dot_product_attention = ORIGINAL


# ------------------------------------------------------------------------------------------- threads

def test_threads_install_and_route_concurrently():
    """8 threads enter/leave the patch 25 times each while computing attention and its gradient through
    the patched name; every result is exact, the patch is active inside every block, and the original
    object is back at the end. (Reverse mode only: PyTorch's forward-AD level is process-global, so
    torch.func.jvp itself is not thread-safe, with or without flowmap_kernels.)"""
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, Lq=5, Lk=5, D=4)
    want = ref_attention(q, k, v, is_causal=True)
    qg = q.clone().requires_grad_()
    (want_dq,) = torch.autograd.grad(ref_attention(qg, k, v, is_causal=True).square().sum(), qg)
    errors, barrier = [], threading.Barrier(8)

    def run():
        x = q.clone().requires_grad_()
        assert _is_router(F.scaled_dot_product_attention)
        o = F.scaled_dot_product_attention(x, k, v, is_causal=True)
        (dq,) = torch.autograd.grad(o.square().sum(), x)
        assert rel_err(o, want) < 1e-12 and rel_err(dq, want_dq) < 1e-12

    def worker(i):
        try:
            barrier.wait()
            for j in range(25):
                if (i + j) % 2:
                    with patch_sdpa():
                        run()
                else:
                    install()
                    try:
                        run()
                    finally:
                        uninstall()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert F.scaled_dot_product_attention is ORIGINAL and not is_installed()
    assert fallback_counts() == {}


def test_mask_with_a_tangent_is_served():
    """A float mask computed from a JVP input: fk.attention follows its tangent (the naive math); equal to the
    original under SDPA's math backend, no fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv(dtype=torch.float32)
    x, tx = torch.randn(1, 1, 7, 7), torch.randn(1, 1, 7, 7)

    def f(m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=2 * m)

    with sdpa_kernel(SDPBackend.MATH):
        want = torch.func.jvp(f, (x,), (tx,))
    with patch_sdpa():
        got = torch.func.jvp(f, (x,), (tx,))
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6 and want[1].abs().max() > 0
    assert fallback_counts() == {}


def test_learned_bias_is_served_under_jvp_and_backward():
    """A learned relative-position bias passed as attn_mask (as T5 / Swin style models do): the JVP of the
    patched model and the bias's gradient through (O, tO) match the math backend's, no fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = _qkv(dtype=torch.float64)
    tq = torch.randn_like(q)
    bias = torch.randn(1, 4, 7, 7, dtype=torch.float64, requires_grad=True)

    def grads():
        def f(x):
            return F.scaled_dot_product_attention(x, k, v, attn_mask=bias)
        o, to = torch.func.jvp(f, (q,), (tq,))
        return torch.autograd.grad((o * o).sum() + (to * to).sum(), bias)[0]

    with sdpa_kernel(SDPBackend.MATH):
        want = grads()
    with patch_sdpa():
        got = grads()
    assert rel_err(got, want) < 1e-12
    assert fallback_counts() == {}
