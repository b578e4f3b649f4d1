"""torch.compile and torch.export with shapes that vary: dynamic sequence lengths (``dynamic=True``, or the
second length Dynamo sees), packed sequences (offsets are data, unreadable while tracing), one tensor passed
as several operands, and ``torch.export`` with a ``Dim`` on the length.

Each compiled result is compared with the float64 references of tests/reference.py. Backend "aot_eager"
keeps compile times to seconds on 2 cores.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from torch.export import Dim, export

import flowmap_kernels as fk
from flowmap_kernels import ops
from flowmap_kernels.attention import functional
from flowmap_kernels.attention.functional import CompiledForwardModeWarning
from tests.numerics import rel_err
from tests.reference import ref_attention, ref_jvp, ref_varlen

LENGTHS = (7, 12, 33)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dense(L: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + L)
    q = torch.randn(2, 4, L, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, L + 3, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, L + 3, 5, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)]


def _grads(out, inputs):
    return torch.autograd.grad(out.square().sum(), inputs)


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_attention_compiles_fullgraph_for_every_length(dynamic, backend):
    """One graph serves every length (dynamic=True; None: Dynamo turns the lengths dynamic at the second);
    the backend is chosen once, at trace time. Before: the choice took the symbolic lengths and raised."""
    def attn(q, k, v):
        return fk.attention(q, k, v, is_causal=True, enable_gqa=True)

    cf = torch.compile(attn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L in LENGTHS:
        q, k, v = _dense(L)
        with fk.use_backend(backend):
            out = cf(q, k, v)
            grads = _grads(out, (q, k, v))
        want = ref_attention(q, k, v, is_causal=True)
        assert rel_err(out, want) < 1e-12
        for g, w in zip(grads, _grads(want, (q, k, v))):
            assert rel_err(g, w) < 1e-12


def test_attention_with_a_mask_and_forward_mode_under_dynamic_shapes():
    """A boolean mask whose size follows the length, and torch.func.jvp inside the compiled function (the naive
    math, with the warning that says so)."""
    def masked(q, k, v, m):
        return fk.attention(q, k, v, attn_mask=m, enable_gqa=True)

    def tangent(q, k, v, tq, tk, tv):
        return torch.func.jvp(lambda a, b, c: fk.attention(a, b, c, enable_gqa=True), (q, k, v), (tq, tk, tv))

    functional._WARNED_COMPILED_FORWARD_MODE[0] = False  # (it warns once per process)
    cm = torch.compile(masked, fullgraph=True, dynamic=True, backend="aot_eager")
    ct = torch.compile(tangent, fullgraph=True, dynamic=True, backend="aot_eager")
    for L in LENGTHS:
        q, k, v = _dense(L)
        m = torch.rand(L, L + 3, generator=torch.Generator().manual_seed(L)) > 0.4
        assert rel_err(cm(q, k, v, m), ref_attention(q, k, v, attn_mask=m)) < 1e-12
        tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
        with pytest.warns(CompiledForwardModeWarning) if L == LENGTHS[0] else contextlib.nullcontext():
            o, to = ct(q, k, v, tq, tk, tv)
        ro, rto = ref_jvp(q, k, v, tq, tk, tv)
        assert rel_err(o, ro) < 1e-12 and rel_err(to, rto) < 1e-12


# ---- packed sequences ------------------------------------------------------------------------------------

def _packed(L: int, seed: int = 0):
    """Three sequences (one with no queries), Lq != Lk per sequence, GQA; float64."""
    g = torch.Generator().manual_seed(seed + L)
    cu_q = torch.tensor([0, L // 3, L // 3, L], dtype=torch.int32)
    cu_k = torch.tensor([0, L // 2, L // 2 + 1, L + 5], dtype=torch.int32)
    q = torch.randn(L, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(L + 5, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(L + 5, 2, 6, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)], cu_q, cu_k


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["auto", "naive"])
@pytest.mark.parametrize("max_seqlen", [None, 64])
def test_attention_varlen_compiles_fullgraph(dynamic, backend, max_seqlen):
    """Before: the offsets were read on the host while tracing (an error under fullgraph=True, a Dynamo crash
    after the graph break without it). Now their shapes are checked at trace time, their values in the graph."""
    def packed(q, k, v, cu_q, cu_k):
        return fk.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen, max_seqlen, is_causal=True, enable_gqa=True)

    cf = torch.compile(packed, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for L in LENGTHS:
        (q, k, v), cu_q, cu_k = _packed(L)
        with fk.use_backend(backend):
            out = cf(q, k, v, cu_q, cu_k)
            grads = _grads(out, (q, k, v))
        want = ref_varlen(q, k, v, cu_q, cu_k, is_causal=True)
        assert rel_err(out, want) < 1e-12
        for g, w in zip(grads, _grads(want, (q, k, v))):
            assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_attention_varlen_forward_mode_under_compile(backend):
    """Explicit (attention_varlen_jvp) and torch.func.jvp forms inside one compiled function, with gradients of
    the tangent output."""
    def both(q, k, v, tq, tk, tv, cu_q, cu_k):
        o, to = fk.attention_varlen_jvp(q, k, v, tq, tk, tv, cu_q, cu_k, enable_gqa=True)
        o2, to2 = torch.func.jvp(lambda a, b, c: fk.attention_varlen(a, b, c, cu_q, cu_k, enable_gqa=True),
                                 (q, k, v), (tq, tk, tv))
        return o, to, o2, to2

    cf = torch.compile(both, fullgraph=True, dynamic=True, backend="aot_eager")
    for L in LENGTHS[:2]:
        (q, k, v), cu_q, cu_k = _packed(L)
        tq, tk, tv = (torch.randn_like(x) for x in (q, k, v))
        with fk.use_backend(backend):
            o, to, o2, to2 = cf(q, k, v, tq, tk, tv, cu_q, cu_k)
            g = torch.autograd.grad(to.square().sum(), (q, k, v))
        ro, rto = ref_varlen(q, k, v, cu_q, cu_k, (tq, tk, tv))
        for got in ((o, ro), (to, rto), (o2, ro), (to2, rto)):
            assert rel_err(*got) < 1e-12
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        rg = torch.autograd.grad(ref_varlen(qq, kk, vv, cu_q, cu_k, (tq, tk, tv))[1].square().sum(),
                                 (qq, kk, vv))
        for a, b in zip(g, rg):
            assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("offsets, max_seqlen", [([0, 7, 5, 16], 10), ([1, 5, 5, 16], 10), ([0, 5, 5, 15], 10),
                                                 ([0, 5, 5, 16], 10)],
                         ids=["decreasing", "not-from-0", "short-total", "longer-than-max"])
def test_attention_varlen_compiled_offsets_are_checked_when_the_graph_runs(offsets, max_seqlen):
    def packed(q, k, v, cu):
        return fk.attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen)

    cf = torch.compile(packed, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(16, 2, 8) for _ in range(3))
    good = torch.tensor([0, 8, 8, 16], dtype=torch.int32)
    assert rel_err(cf(q, k, v, good), fk.attention_varlen(q, k, v, good, good)) < 1e-6
    with pytest.raises(RuntimeError, match="cu_seqlens_q: offsets must start at 0"):
        cf(q, k, v, torch.tensor(offsets, dtype=torch.int32))


# ---- one tensor as several operands ------------------------------------------------------------------------

def test_one_tensor_as_several_operands_compiles_fullgraph():
    """Dynamo refuses an autograd.Function given the same tensor twice; the ops pass an alias instead."""
    def fn(x, c):
        a = fk.attention(x, x, x)
        return ops.modulated_layer_norm(a, c, c), ops.gated_residual(a, c, a)

    cf = torch.compile(fn, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    got = cf(x, c)
    with fk.use_backend("naive"):
        want = fn(x, c)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    g = torch.autograd.grad(sum(o.square().sum() for o in got), (x, c))
    gw = torch.autograd.grad(sum(o.square().sum() for o in want), (x, c))
    for a, b in zip(g, gw):
        assert rel_err(a, b) < 1e-12


# ---- torch.export with a dynamic length ------------------------------------------------------------------

class _Block(torch.nn.Module):
    """Attention and the DiT primitives on (B, N, C) tokens."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.2 * torch.randn(48, 16, generator=g))
        self.norm = torch.nn.Parameter(torch.ones(8))

    def forward(self, x, c):
        h = ops.modulated_layer_norm(x, c[:, :, :16], c[:, :, 16:])
        q, k, v = ops.linear(h, self.w).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        a = fk.attention(ops.rms_norm(q, self.norm), ops.rms_norm(k, self.norm), v, is_causal=True)
        return ops.gated_residual(x, c[:, :, :16], ops.gelu_tanh(a.transpose(1, 2).flatten(2)))


def test_non_strict_export_with_a_dynamic_length():
    """Before: RMSNorm's chunking of its weight gradient guarded on the length's divisors, which a Dim refuses."""
    m = _Block()
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 1, 32, generator=g)
    ep = export(m, (torch.randn(2, 8, 16, generator=g), c), dynamic_shapes=({1: Dim("N", min=2, max=1024)}, None))
    for n in (3, 13, 40):
        x = torch.randn(2, n, 16, generator=g)
        assert rel_err(ep.module()(x, c), m(x, c)) < 1e-6


class _Attention(torch.nn.Module):
    def forward(self, x):
        return fk.attention(x, x, x, is_causal=True)


class _RMSNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        return ops.rms_norm(x, self.weight)


def test_strict_export_with_a_dynamic_length():
    """Before: the backend choice took the symbolic length (attention), and RMSNorm's backward viewed its
    gradient with a shape saved from the forward's trace."""
    g = torch.Generator().manual_seed(2)
    ep = export(_Attention(), (torch.randn(2, 2, 8, 8),), dynamic_shapes=({2: Dim("N", min=2, max=1024)},),
                strict=True)
    y = torch.randn(2, 2, 13, 8, generator=g)
    assert rel_err(ep.module()(y), ref_attention(y, y, y, is_causal=True)) < 1e-5
    norm = _RMSNorm()
    ep = export(norm, (torch.randn(2, 8, 16),), dynamic_shapes=({1: Dim("N", min=2, max=1024)},), strict=True)
    y = torch.randn(2, 13, 16, generator=g)
    assert rel_err(ep.module()(y), norm(y)) < 1e-6


def test_export_packed_attention_with_a_dynamic_total():
    class Packed(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return fk.attention_varlen(q, k, v, cu, cu, is_causal=True)

    T = Dim("T", min=2, max=4096)
    q, k, v = (torch.randn(32, 2, 8) for _ in range(3))
    ep = export(Packed(), (q, k, v, torch.tensor([0, 10, 32], dtype=torch.int32)),
                dynamic_shapes=({0: T}, {0: T}, {0: T}, None))
    q, k, v = (torch.randn(45, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 20, 45], dtype=torch.int32)
    assert rel_err(ep.module()(q, k, v, cu), fk.attention_varlen(q, k, v, cu, cu, is_causal=True)) < 1e-6


def test_exported_program_loads_after_import_flowmap_kernels(tmp_path):
    """torch.export.load in a fresh process that imported only ``flowmap_kernels`` finds every custom op (the DiT
    primitives' ops used to register only on ``import flowmap_kernels.ops``)."""
    m = _Block()
    x, c = torch.randn(2, 8, 16), torch.randn(2, 1, 32)
    torch.export.save(export(m, (x, c)), tmp_path / "block.pt2")
    torch.save({"x": x, "c": c, "y": m(x, c).detach()}, tmp_path / "io.pt")
    script = (f"import torch, flowmap_kernels\n"
              f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
              f"ep = torch.export.load({str(tmp_path / 'block.pt2')!r})\n"
              f"assert (ep.module()(io['x'], io['c']) - io['y']).abs().max().item() == 0.0\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
