"""attention_varlen / attention_varlen_jvp (packed variable-length sequences) against the float64 reference.

The reference runs tests.reference (math attention on explicit scores, its JVP by torch.func.jvp, gradients
by autograd) on each sequence alone, unpacked to (1, H, L, D); a sequence with queries but no keys gives
zero outputs and zero gradients by definition. For each case: O and tO by torch.func.jvp, by forward_ad
dual tensors and by the explicit attention_varlen_jvp, then the six gradients of a loss on both outputs
(backward through the tangent), within tests.numerics.TOLERANCE, on the naive and torch backends.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

import flowmap_kernels as fk
from flowmap_kernels.attention import ATTENTION_VARLEN, make_varlen_problem
from flowmap_kernels.attention.varlen_blockwise import (varlen_backward, varlen_forward, varlen_jvp_backward,
                                                       varlen_jvp_forward)
from flowmap_kernels.backends import BackendUnavailableError
from tests.numerics import TOLERANCE, rel_err
from tests.reference import jvp_of_jvp, loss_on_outputs, ref_attention, ref_varlen

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
NAMES = ("q", "k", "v", "tq", "tk", "tv")


def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _heads_first(x):
    return x.transpose(0, 1).unsqueeze(0)


def _tokens_first(x):
    return x[0].transpose(0, 1)


@dataclass
class VarlenCase:
    q_lens: tuple
    k_lens: Optional[tuple] = None  # None: the query lengths
    q_heads: int = 2
    kv_heads: int = 2
    head_dim: int = 16
    v_head_dim: Optional[int] = None
    causal: bool = False
    scale: Optional[float] = None
    seed: int = 0

    @property
    def klens(self) -> tuple:
        return self.q_lens if self.k_lens is None else self.k_lens

    @property
    def kwargs(self) -> dict:
        return dict(is_causal=self.causal, scale=self.scale, enable_gqa=self.q_heads != self.kv_heads)

    def id(self) -> str:
        parts = [f"Lq{'.'.join(map(str, self.q_lens))}", f"Lk{'.'.join(map(str, self.klens))}",
                 f"H{self.q_heads}/{self.kv_heads}", f"D{self.head_dim}" + (f"v{self.v_head_dim}" if self.v_head_dim
                                                                           else "")]
        if self.causal:
            parts.append("causal")
        if self.scale is not None:
            parts.append(f"s{self.scale}")
        return "-".join(parts)

    def make(self, dtype, requires_grad=False) -> dict:
        """Packed inputs and tangents in ``dtype`` (drawn in float64, then rounded), float64 loss weights,
        int32 offsets."""
        g = torch.Generator().manual_seed(self.seed)
        dv = self.v_head_dim or self.head_dim
        tq, tk = sum(self.q_lens), sum(self.klens)
        shapes = {"q": (tq, self.q_heads, self.head_dim), "k": (tk, self.kv_heads, self.head_dim),
                  "v": (tk, self.kv_heads, dv)}
        t = {}
        for name in ("q", "k", "v"):
            t[name] = torch.randn(shapes[name], generator=g, dtype=torch.float64).to(dtype)
            t["t" + name] = torch.randn(shapes[name], generator=g, dtype=torch.float64).to(dtype)
        for name in NAMES:
            t[name].requires_grad_(requires_grad)
        t["wo"] = torch.randn((tq, self.q_heads, dv), generator=g, dtype=torch.float64)
        t["wt"] = torch.randn((tq, self.q_heads, dv), generator=g, dtype=torch.float64)
        t["cu_q"], t["cu_k"] = _offsets(self.q_lens), _offsets(self.klens)
        return t


def reference(case: VarlenCase, t: dict):
    """(O, tO) and the six gradients of loss_on_outputs, float64, sequence by sequence (tests.reference)."""
    leaves = [t[n].detach().double().requires_grad_() for n in NAMES]
    o, to = ref_varlen(*leaves[:3], t["cu_q"], t["cu_k"], leaves[3:], **case.kwargs)
    grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), leaves, materialize_grads=True)
    return o.detach(), to.detach(), dict(zip(NAMES, grads))


def _args(case, t):
    return (t["cu_q"], t["cu_k"], max(case.q_lens, default=0), max(case.klens, default=0))


def _jvp_func(case, t):
    return torch.func.jvp(lambda a, b, c: fk.attention_varlen(a, b, c, *_args(case, t), **case.kwargs),
                          (t["q"], t["k"], t["v"]), (t["tq"], t["tk"], t["tv"]))


def _jvp_dual(case, t):
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t[n], t["t" + n]) for n in ("q", "k", "v")]
        out = fwAD.unpack_dual(fk.attention_varlen(*duals, *_args(case, t), **case.kwargs))
        return out.primal, out.tangent


def _jvp_explicit(case, t):
    return fk.attention_varlen_jvp(*(t[n] for n in NAMES), *_args(case, t), **case.kwargs)


PATHS = {"func.jvp": _jvp_func, "forward_ad": _jvp_dual, "attention_varlen_jvp": _jvp_explicit}

CASES = [
    VarlenCase(q_lens=(17,)),  # a single sequence
    VarlenCase(q_lens=(5, 33, 1, 12), head_dim=24, causal=True),
    VarlenCase(q_lens=(7, 20, 3), k_lens=(13, 9, 30), q_heads=4, kv_heads=2, head_dim=24, v_head_dim=40,
               scale=0.37),
    VarlenCase(q_lens=(0, 6, 5, 0, 3), k_lens=(4, 0, 7, 0, 8), q_heads=6, kv_heads=2, head_dim=8,
               causal=True),  # empty sequences: no query, no key, neither
    VarlenCase(q_lens=(12, 9, 40), k_lens=(5, 9, 19), q_heads=3, kv_heads=1, head_dim=16, causal=True),  # Lq > Lk
]


def _check(case: VarlenCase, dtype, backend: str, path: str):
    t = case.make(dtype, requires_grad=True)
    ro, rto, rgrads = reference(case, t)
    with fk.use_backend(backend):
        o, to = PATHS[path](case, t)
        assert o.dtype == dtype and to.dtype == dtype and o.shape == ro.shape and to.shape == rto.shape
        grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), [t[n] for n in NAMES])
    tol = TOLERANCE[dtype]
    errors = {"o": rel_err(o, ro), "to": rel_err(to, rto)}
    for name, g in zip(NAMES, grads):
        assert g.dtype == dtype and g.shape == t[name].shape
        errors["d" + name] = rel_err(g, rgrads[name])
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{case.id()} {dtype} {backend} {path}: errors over {tol}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=VarlenCase.id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_matches_per_sequence_reference(case, dtype, path, backend):
    _check(case, dtype, backend, path)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_primal_and_its_gradients(backend, dtype):
    """Without tangents: O and (dQ, dK, dV) of a loss on O alone against the reference."""
    case = CASES[3]
    t = case.make(dtype, requires_grad=True)
    ro, _, _ = reference(case, t)
    with fk.use_backend(backend):
        o = fk.attention_varlen(t["q"], t["k"], t["v"], *_args(case, t), **case.kwargs)
        grads = torch.autograd.grad((o.double() * t["wo"]).sum(), [t["q"], t["k"], t["v"]])
    leaves = [t[n].detach().double().requires_grad_() for n in ("q", "k", "v")]
    ref_o = ref_varlen(*leaves, t["cu_q"], t["cu_k"], **case.kwargs)
    rgrads = torch.autograd.grad((ref_o * t["wo"]).sum(), leaves)
    tol = TOLERANCE[dtype]
    assert rel_err(o, ro) <= tol
    for g, rg in zip(grads, rgrads):
        assert rel_err(g, rg) <= tol


def test_gradient_through_the_primal_output_only():
    """Under forward mode with a loss on O alone, the fused function's backward takes its dtO = None path."""
    case = CASES[2]
    t = case.make(torch.float64, requires_grad=True)
    outs = {}
    for backend in ("torch", "naive"):
        with fk.use_backend(backend):
            o, _ = _jvp_func(case, t)
            outs[backend] = torch.autograd.grad((o * t["wo"]).sum(), [t["q"], t["k"], t["v"]])
    for g, rg in zip(outs["torch"], outs["naive"]):
        assert rel_err(g, rg) <= 1e-12


@pytest.mark.parametrize("kind", ["primal", "jvp"])
def test_double_backward_matches_naive(kind):
    """create_graph=True through the kernels' backward (naive recomputation) equals the naive math's."""
    case = CASES[1]
    t = case.make(torch.float64, requires_grad=True)
    results = {}
    for backend in ("torch", "naive"):
        with fk.use_backend(backend):
            if kind == "primal":
                o = fk.attention_varlen(t["q"], t["k"], t["v"], *_args(case, t), **case.kwargs)
                loss = (o * t["wo"]).sum()
            else:
                o, to = _jvp_explicit(case, t)
                loss = loss_on_outputs(o, to, t["wo"], t["wt"])
            first = torch.autograd.grad(loss, [t["q"], t["k"], t["v"]], create_graph=True)
            second = torch.autograd.grad(sum((g ** 2).sum() for g in first), [t[n] for n in NAMES],
                                         allow_unused=True)
        results[backend] = second
    for name, g, rg in zip(NAMES, results["torch"], results["naive"]):
        if rg is None:
            assert g is None or g.abs().max() == 0, name
        else:
            assert rel_err(g, rg) <= 1e-10, name


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_jvp_of_jvp(backend):
    """Forward-over-forward (nested torch.func.jvp) against the nested float64 reference, sequence by sequence
    (an empty sequence included)."""
    case = VarlenCase(q_lens=(5, 0, 9), k_lens=(7, 3, 4), q_heads=4, kv_heads=2, head_dim=8, v_head_dim=5,
                      causal=True)
    t = case.make(torch.float64)
    g = torch.Generator().manual_seed(2)
    primals = tuple(t[n] for n in ("q", "k", "v"))
    inner = tuple(t[n] for n in ("tq", "tk", "tv"))
    outer = tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) for x in primals)
    with fk.use_backend(backend):
        got = jvp_of_jvp(lambda a, b, c: fk.attention_varlen(a, b, c, *_args(case, t), **case.kwargs), primals,
                         inner, outer)[1][1]
    want = torch.zeros_like(got)
    cq, ck = t["cu_q"].tolist(), t["cu_k"].tolist()
    for i in range(len(case.q_lens)):
        rows = (slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1]), slice(ck[i], ck[i + 1]))
        pick = lambda xs: tuple(_heads_first(x[r]) for x, r in zip(xs, rows))  # noqa: E731
        want[rows[0]] = _tokens_first(jvp_of_jvp(lambda a, b, c: ref_attention(a, b, c, **case.kwargs),
                                                 pick(primals), pick(inner), pick(outer))[1][1])
    assert want.abs().max() > 0 and rel_err(got, want) < 1e-10


def test_no_attention_across_sequences():
    """Changing one sequence's keys and values leaves the other sequences' outputs unchanged."""
    case = CASES[2]
    t = case.make(torch.float64)
    args = _args(case, t)
    o = fk.attention_varlen(t["q"], t["k"], t["v"], *args, **case.kwargs)
    k2, v2 = t["k"].clone(), t["v"].clone()
    k2[13:22] += 1.0  # keys of sequence 1
    v2[13:22] -= 2.0
    o2 = fk.attention_varlen(t["q"], k2, v2, *args, **case.kwargs)
    assert torch.equal(o[:7], o2[:7]) and torch.equal(o[27:], o2[27:])
    assert not torch.allclose(o[7:27], o2[7:27])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_launcher_contract(dtype):
    """The four kernel functions (the contract the Triton launchers share): shapes, dtypes, lse and mu
    against float64 per-row formulas, -inf / 0 on rows with no key, zero gradients where nothing attends."""
    case = CASES[3]
    t = case.make(dtype)
    cu_q, cu_k = t["cu_q"], t["cu_k"]
    scale = 0.3
    q, k, v, tq, tk, tv = (t[n] for n in NAMES)
    o, to, lse, mu = varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, 6, 8, True, scale)
    o1, lse1 = varlen_forward(q, k, v, cu_q, cu_k, 6, 8, True, scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lse.shape == mu.shape == (6, q.shape[0]) and lse.dtype == mu.dtype == lse1.dtype == acc
    assert torch.equal(o, o1) and torch.equal(lse, lse1)
    qd, kd, tqd, tkd = (x.double().repeat_interleave(3, dim=1) if x.shape[1] == 2 else x.double()
                        for x in (q, k, tq, tk))
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(case.q_lens)):
        rq, rk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        if cq[i + 1] == cq[i]:
            continue
        if ck[i + 1] == ck[i]:
            assert torch.all(lse[:, rq] == float("-inf")) and torch.all(mu[:, rq] == 0)
            assert torch.all(o[rq] == 0) and torch.all(to[rq] == 0)
            continue
        s = torch.einsum("ihd,jhd->hij", qd[rq], kd[rk]) * scale
        ts = (torch.einsum("ihd,jhd->hij", tqd[rq], kd[rk]) + torch.einsum("ihd,jhd->hij", qd[rq], tkd[rk])) * scale
        keep = torch.ones(s.shape[1:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
        ref_lse = torch.logsumexp(s, dim=-1)
        ref_mu = (torch.softmax(s, dim=-1) * ts.masked_fill(~keep, 0)).sum(-1)
        assert rel_err(lse[:, rq], ref_lse) <= 1e-6
        assert rel_err(mu[:, rq], ref_mu) <= (TOLERANCE[dtype] if dtype != torch.float64 else 1e-12)
    do = torch.randn_like(o)
    dq, dk, dv = varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, 6, 8, True, scale)
    grads = varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, None, do, cu_q, cu_k, 6, 8, True, scale)
    for g, x in zip((dq, dk, dv) + tuple(grads), (q, k, v, q, k, v, tq, tk, tv)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
    # sequence 1 (queries 0:6, no key) and sequence 3 (none) get zero gradients; sequence 0 (keys 0:4, no query)
    for g in (dq, grads[0], grads[3]):
        assert torch.all(g[0:6] == 0)
    for g in (dk, dv, grads[1], grads[2], grads[4], grads[5]):
        assert torch.all(g[0:4] == 0)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counts_match_the_naive_math():
    """FlopCounterMode sees the custom ops with the products of the math, sum_i Lq_i Lk_i (no padding)."""
    case = CASES[2]
    t = case.make(torch.float32, requires_grad=True)
    pairs = sum(a * b for a, b in zip(case.q_lens, case.klens))
    qk, pv = 2 * case.q_heads * pairs * case.head_dim, 2 * case.q_heads * pairs * case.v_head_dim

    def forward_backward():
        fk.attention_varlen(t["q"], t["k"], t["v"], *_args(case, t), **case.kwargs).sum().backward()

    def jvp_backward_both():
        o, to = _jvp_func(case, t)
        (o.sum() + (to ** 2).sum()).backward()

    for work, expected in ((forward_backward, 3 * (qk + pv)), (jvp_backward_both, 9 * (qk + pv))):
        for backend in ("torch", "naive"):
            with fk.use_backend(backend):
                assert _flops(work) == expected, (work.__name__, backend)


def test_offsets_int64_and_generous_max_seqlen():
    case = CASES[2]
    t = case.make(torch.float64)
    args = (t["q"], t["k"], t["v"])
    o = fk.attention_varlen(*args, t["cu_q"], t["cu_k"], None, None, **case.kwargs)
    o64 = fk.attention_varlen(*args, t["cu_q"].long(), t["cu_k"].long(), 100, 100, **case.kwargs)
    assert torch.equal(o, o64)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("as_int", [np.int64, np.int32, int], ids=["np.int64", "np.int32", "int"])
def test_numpy_integer_max_seqlen_is_an_int(backend, as_int):
    """max_seqlen_q / max_seqlen_k computed with numpy (np.int64 from lengths.max()) are integers: accepted like
    Python ints (they were a TypeError), for the primal and the explicit JVP."""
    case = CASES[2]
    t = case.make(torch.float64)
    args = (t["q"], t["k"], t["v"])
    tangents = (t["tq"], t["tk"], t["tv"])
    with fk.use_backend(backend):
        o = fk.attention_varlen(*args, t["cu_q"], t["cu_k"], None, None, **case.kwargs)
        on = fk.attention_varlen(*args, t["cu_q"], t["cu_k"], as_int(100), as_int(100), **case.kwargs)
        oj, toj = fk.attention_varlen_jvp(*args, *tangents, t["cu_q"], t["cu_k"], **case.kwargs)
        ojn, tojn = fk.attention_varlen_jvp(*args, *tangents, t["cu_q"], t["cu_k"], as_int(100), as_int(100),
                                            **case.kwargs)
    assert torch.equal(o, on) and torch.equal(oj, ojn) and torch.equal(toj, tojn)


def test_zero_sequences():
    q = torch.zeros(0, 2, 8)
    cu = torch.zeros(1, dtype=torch.int32)
    for backend in ("torch", "naive"):
        with fk.use_backend(backend):
            o, to = fk.attention_varlen_jvp(q, q, q, q, q, q, cu, cu, 0, 0)
        assert o.shape == to.shape == (0, 2, 8)


def test_backend_registry():
    case = CASES[0]
    t = case.make(torch.float32)
    p = make_varlen_problem(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"])
    assert ATTENTION_VARLEN.resolve("auto", **p.as_dict()).backend == "torch"
    assert ATTENTION_VARLEN.resolve("naive", **p.as_dict()).backend == "naive"
    assert set(ATTENTION_VARLEN.impls) == {"naive", "torch", "triton"}
    before = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with pytest.raises(BackendUnavailableError, match="attention_varlen"):
            with fk.use_backend("triton"):
                fk.attention_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"])
    finally:
        if before is not None:
            os.environ["TRITON_INTERPRET"] = before


# ---- argument errors ------------------------------------------------------------------------------------
def _good():
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 6)
    return dict(query=q, key=k, value=v, cu_seqlens_q=_offsets((3, 4)), cu_seqlens_k=_offsets((5, 4)),
                max_seqlen_q=None, max_seqlen_k=None, enable_gqa=True)


ERRORS = [
    (dict(query=[1.0]), TypeError, "query: expected a torch.Tensor"),
    (dict(query=torch.randn(1, 7, 4, 8)), ValueError, "query: expected 3 dims"),
    (dict(key=torch.randn(9, 2, 8, dtype=torch.float64)), ValueError, "key: dtype"),
    (dict(query=torch.randn(7, 4, 8).int()), ValueError, "query: expected dtype"),
    (dict(key=torch.randn(9, 2, 5)), ValueError, "key: head_dim 5"),
    (dict(value=torch.randn(8, 2, 6)), ValueError, "value: tokens and heads"),
    (dict(key=torch.randn(9, 3, 8), value=torch.randn(9, 3, 6)), ValueError, "multiple of key/value heads"),
    (dict(enable_gqa=False), ValueError, "enable_gqa=True"),
    (dict(cu_seqlens_q=[0, 3, 7]), TypeError, "cu_seqlens_q: expected a torch.Tensor"),
    (dict(cu_seqlens_q=_offsets((3, 4)).float()), ValueError, "cu_seqlens_q: expected dtype torch.int32"),
    (dict(cu_seqlens_k=_offsets((5, 4))[None]), ValueError, "cu_seqlens_k: expected a 1-D tensor"),
    (dict(cu_seqlens_k=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens_k: expected a 1-D tensor"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, "cu_seqlens_q: must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 6, 5, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_k: must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 6], dtype=torch.int32)), ValueError,
     "cu_seqlens_q: last offset 6 must equal the number of packed tokens 7"),
    (dict(cu_seqlens_k=_offsets((5, 4, 0))), ValueError, "cu_seqlens_k: length 4 .3 sequences. does not match"),
    (dict(max_seqlen_q=3), ValueError, "max_seqlen_q: 3 is less than the longest sequence .4 tokens."),
    (dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k: expected an int"),
    (dict(max_seqlen_k=True), TypeError, "max_seqlen_k: expected an int"),
    (dict(scale=torch.tensor([0.5, 1.0])), TypeError, "scale: expected None, a real number or a 0-d real tensor"),
    (dict(scale=torch.tensor(0.5, requires_grad=True)), TypeError, "scale: a tensor that requires grad"),
    (dict(scale=float("nan")), ValueError, "scale: expected a finite number"),
    (dict(is_causal=1), TypeError, "is_causal: expected a bool"),
]


@pytest.mark.parametrize("change,error,match", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_argument_errors(change, error, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(error, match=match):
        fk.attention_varlen(**kw)


def test_offsets_on_another_device_is_an_error():
    kw = _good()
    kw["cu_seqlens_q"] = kw["cu_seqlens_q"].to("meta")
    with pytest.raises(ValueError, match="cu_seqlens_q: device meta does not match query device cpu"):
        fk.attention_varlen(**kw)


def test_tangent_errors():
    kw = _good()
    q, k, v = kw.pop("query"), kw.pop("key"), kw.pop("value")
    args = (kw.pop("cu_seqlens_q"), kw.pop("cu_seqlens_k"))
    with pytest.raises(ValueError, match="tangent of key: expected shape"):
        fk.attention_varlen_jvp(q, k, v, None, torch.randn(9, 2, 7), None, *args, enable_gqa=True)
    with pytest.raises(ValueError, match="tangent of query"):
        torch.func.jvp(lambda a: fk.attention_varlen(a, k, v, *args, enable_gqa=True), (q,), (q.double(),))


# ---- autograd modes -------------------------------------------------------------------------------------
GRAD_CASE = VarlenCase(q_lens=(3, 0, 4, 2), k_lens=(5, 2, 0, 3), q_heads=2, kv_heads=1, head_dim=3,
                       v_head_dim=4, causal=True, scale=0.8)


def _grad_inputs():
    t = GRAD_CASE.make(torch.float64, requires_grad=True)
    return t, [t[n] for n in NAMES], _args(GRAD_CASE, t)


def test_gradcheck_primal_tangent_and_explicit_jvp():
    t, xs, args = _grad_inputs()
    kw = GRAD_CASE.kwargs

    def tangent(q, k, v, tq, tk, tv):
        return torch.func.jvp(lambda a, b, c: fk.attention_varlen(a, b, c, *args, **kw), (q, k, v), (tq, tk, tv))[1]

    assert torch.autograd.gradcheck(lambda q, k, v: fk.attention_varlen(q, k, v, *args, **kw), xs[:3])
    assert torch.autograd.gradcheck(tangent, xs)
    assert torch.autograd.gradcheck(lambda *a: fk.attention_varlen_jvp(*a, *args, **kw), xs)
    assert torch.autograd.gradgradcheck(lambda q, k, v: fk.attention_varlen(q, k, v, *args, **kw), xs[:3])


def test_func_grad_over_func_jvp():
    t, xs, args = _grad_inputs()
    kw = GRAD_CASE.kwargs

    def loss(q, k, v, backend):
        with fk.use_backend(backend):
            _, to = torch.func.jvp(lambda a, b, c: fk.attention_varlen(a, b, c, *args, **kw), (q, k, v),
                                   (t["tq"].detach(), t["tk"].detach(), t["tv"].detach()))
        return (to ** 2).sum()

    plain = [x.detach() for x in xs[:3]]
    ours = torch.func.grad(loss, argnums=(0, 1, 2))(*plain, "torch")
    ref = torch.func.grad(loss, argnums=(0, 1, 2))(*plain, "naive")
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-12


def test_stop_gradient_on_the_tangent_skips_the_tangent_backward(monkeypatch):
    """A detached tangent must not run the backward through the JVP (MeanFlow / sCM cost model)."""
    from flowmap_kernels.attention import kernels
    calls = {"jvp_backward": 0, "backward": 0}

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(kernels, "attention_varlen_jvp_backward", count("jvp_backward",
                                                                         kernels.attention_varlen_jvp_backward))
    monkeypatch.setattr(kernels, "attention_varlen_backward", count("backward", kernels.attention_varlen_backward))
    t, xs, args = _grad_inputs()
    o, to = torch.func.jvp(lambda a, b, c: fk.attention_varlen(a, b, c, *args, **GRAD_CASE.kwargs),
                           tuple(xs[:3]), tuple(xs[3:]))
    ((o - to.detach()) ** 2).sum().backward()
    assert calls == {"jvp_backward": 0, "backward": 1}


def test_fallback_jvp_rule_of_the_primal_function():
    """VarlenFunction's own jvp rule (where ``attention_varlen`` cannot see the tangents) is exact."""
    from flowmap_kernels.attention.varlen import VarlenFunction
    case = CASES[2]
    t = case.make(torch.float64, requires_grad=True)
    xs = [t[n] for n in NAMES]
    p = make_varlen_problem(*xs[:3], t["cu_q"], t["cu_k"], **case.kwargs)
    o, to = torch.func.jvp(lambda a, b, c: VarlenFunction.apply(a, b, c, t["cu_q"], t["cu_k"], p, "torch")[0],
                           tuple(xs[:3]), tuple(xs[3:]))
    grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), xs)
    ro, rto, rgrads = reference(case, t)
    assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12
    for n, g in zip(NAMES, grads):
        assert rel_err(g, rgrads[n]) < 1e-12


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations and AOT dispatch of the four packed-attention custom ops."""
    from flowmap_kernels.attention import kernels
    case = CASES[3]
    t = case.make(torch.float32)
    q, k, v, tq, tk, tv = (t[n] for n in NAMES)
    rest = (t["cu_q"], t["cu_k"], 6, 8, True, 0.4, "torch")
    o, to, lse, mu = kernels.attention_varlen_jvp_forward(q, k, v, tq, tk, tv, *rest)
    do = torch.randn_like(o)
    ops = torch.ops.flowmap_kernels
    calls = [(ops.attention_varlen_forward, (q, k, v, *rest)),
             (ops.attention_varlen_jvp_forward, (q, k, v, tq, tk, tv, *rest)),
             (ops.attention_varlen_backward, (q, k, v, o, lse, do, *rest)),
             (ops.attention_varlen_jvp_backward, (q, k, v, tq, tk, tv, o, to, lse, mu, do, do, *rest)),
             (ops.attention_varlen_jvp_backward, (q, k, v, tq, tk, tv, o, to, lse, mu, None, do, *rest))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                     "test_aot_dispatch_dynamic"))
