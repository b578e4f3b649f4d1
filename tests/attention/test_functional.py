"""attention / attention_jvp against the float64 reference, on every PyTorch backend and dtype.

For each case: O and tO from torch.func.jvp over ``attention``, from forward_ad dual tensors, and from the
explicit ``attention_jvp``; then the six gradients of a loss on both outputs (backward through the
tangent). Relative errors must stay within tests.numerics.TOLERANCE.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowmap_kernels as fk
from tests.attention.cases import Case
from tests.numerics import TOLERANCE, rel_err
from tests.reference import loss_on_outputs, ref_attention, ref_grads

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

CASES = [
    Case(batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=8),
    Case(q_len=17, kv_len=17, head_dim=24),
    Case(q_len=77, kv_len=77, head_dim=72, causal=True),
    Case(batch=1, q_len=200, kv_len=300, head_dim=96, mask="bool"),
    Case(batch=1, q_heads=4, kv_heads=2, q_len=77, kv_len=128, head_dim=128, mask="float"),
    Case(q_heads=6, kv_heads=2, q_len=33, kv_len=17, head_dim=8, causal=True, scale=0.37),
    Case(q_len=40, kv_len=40, head_dim=24, v_head_dim=40, mask="bool_dead_rows"),
    Case(q_heads=4, kv_heads=1, q_len=29, kv_len=45, head_dim=16, mask="float_dead_rows", scale=1.7),
    Case(batch=1, q_len=300, kv_len=200, head_dim=24, causal=True),  # causal with Lq > Lk
]


def _jvp_func(case, t):
    return torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, **case.kwargs),
                          (t["q"], t["k"], t["v"]), (t["tq"], t["tk"], t["tv"]))


def _jvp_dual(case, t):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t[n], t["t" + n]) for n in ("q", "k", "v")]
        out = fwAD.unpack_dual(fk.attention(*duals, **case.kwargs))
        return out.primal, out.tangent


def _jvp_explicit(case, t):
    return fk.attention_jvp(t["q"], t["k"], t["v"], t["tq"], t["tk"], t["tv"], **case.kwargs)


PATHS = {"func.jvp": _jvp_func, "forward_ad": _jvp_dual, "attention_jvp": _jvp_explicit}


def _check(case: Case, dtype, backend: str, path: str):
    t = case.make(dtype, requires_grad=True)
    kw = case.kwargs
    (ro, rto), rgrads = ref_grads(t["q"], t["k"], t["v"], t["tq"], t["tk"], t["tv"], t["wo"], t["wt"], **kw)
    with fk.use_backend(backend):
        o, to = PATHS[path](case, t)
    assert o.dtype == dtype and to.dtype == dtype
    tol = TOLERANCE[dtype]
    errors = {"o": rel_err(o, ro), "to": rel_err(to, rto)}
    grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]),
                                [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")])
    for name, g, rg in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, rgrads):
        assert g.dtype == dtype
        errors[name] = rel_err(g, rg)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{case.id()} {dtype} {backend} {path}: errors over {tol}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=Case.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
def test_torch_backend_matches_reference(case, dtype, path):
    _check(case, dtype, "torch", path)


@pytest.mark.parametrize("case", CASES[:5], ids=Case.id)
@pytest.mark.parametrize("path", list(PATHS))
def test_naive_backend_matches_reference(case, path):
    _check(case, torch.float64, "naive", path)


@pytest.mark.parametrize("case", CASES, ids=Case.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_alone_and_its_gradients(case, dtype):
    """A forward called outside any JVP is right, and so are its plain gradients."""
    t = case.make(dtype, requires_grad=True)
    q64, k64, v64 = (t[n].detach().double().requires_grad_() for n in ("q", "k", "v"))
    ref = ref_attention(q64, k64, v64, **case.kwargs)
    rgrads = torch.autograd.grad((ref * t["wo"]).sum(), (q64, k64, v64))
    o = fk.attention(t["q"], t["k"], t["v"], **case.kwargs)
    grads = torch.autograd.grad((o.double() * t["wo"]).sum(), (t["q"], t["k"], t["v"]))
    tol = TOLERANCE[dtype]
    assert rel_err(o, ref) <= tol
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) <= tol


def test_matches_torch_sdpa():
    case = Case(q_heads=4, kv_heads=2, q_len=50, kv_len=60, head_dim=24, mask="bool")
    t = case.make(torch.float64)
    ours = fk.attention(t["q"], t["k"], t["v"], **case.kwargs)
    theirs = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"], **case.kwargs)
    assert rel_err(ours, theirs) < 1e-12


@pytest.mark.parametrize("mask", ["bool_dead_rows", "float_dead_rows"])
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_fully_masked_rows_are_zero(mask, backend):
    case = Case(q_len=12, kv_len=10, head_dim=8, mask=mask)
    t = case.make(torch.float32, requires_grad=True)
    with fk.use_backend(backend):
        o, to = _jvp_func(case, t)
    m = t["mask"]
    allowed = m if m.dtype == torch.bool else m > float("-inf")
    dead = (~allowed.any(dim=-1)).expand(o.shape[:-1])
    assert dead.any()
    assert torch.all(o[dead] == 0) and torch.all(to[dead] == 0)
    grads = torch.autograd.grad((o.sum() + (to ** 2).sum()), [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")])
    assert all(torch.isfinite(g).all() for g in grads)
    # queries whose rows are dead get exactly zero gradient
    assert torch.all(grads[0][dead] == 0) and torch.all(grads[3][dead] == 0)


def test_deterministic_bitwise():
    case = Case(q_heads=4, kv_heads=2, q_len=77, kv_len=90, head_dim=24, mask="float")
    results = []
    for _ in range(2):
        t = case.make(torch.float32, requires_grad=True)
        o, to = _jvp_explicit(case, t)
        grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]),
                                    [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")])
        results.append((o, to) + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_tiles_smaller_than_inputs(monkeypatch):
    """Force several query and key blocks so the online softmax and tile accumulation are exercised."""
    from flowmap_kernels.attention import blockwise
    monkeypatch.setattr(blockwise, "BLOCK_K", 16)
    monkeypatch.setattr(blockwise, "TILE_ELEMENTS", 16 * 16 * 2 * 2)
    for case in (Case(q_len=77, kv_len=50, head_dim=24, causal=True),
                 Case(q_heads=4, kv_heads=2, q_len=45, kv_len=70, head_dim=8, mask="float_dead_rows")):
        _check(case, torch.float64, "torch", "attention_jvp")
        _check(case, torch.float64, "torch", "func.jvp")
