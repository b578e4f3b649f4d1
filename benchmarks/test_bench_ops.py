"""Op benchmarks (pytest-benchmark): attention forward, forward+JVP and backward through the JVP, and each
fused DiT primitive (forward, forward+JVP, backward through (y, ty)), for every backend usable here.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json] [-k attention]

Sizes: CPU B1 H4 N256 D64 attention and (B 4, N 256, C 384) rows in float32; CUDA B4 H8 N2048 D64 and
(B 8, N 1024, C 1152) in bfloat16. Each benchmark's ``extra_info`` records device, dtype, backend, shape.
"""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels import ops
from flowmap_kernels.attention.registry import ATTENTION
from flowmap_kernels.ops.registry import REGISTRIES

from .conftest import bench_device, sync

DEV = bench_device()
CUDA = DEV.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ATT_SHAPE = (4, 8, 2048, 64) if CUDA else (1, 4, 256, 64)
ROW_SHAPE = (8, 1024, 1152) if CUDA else (4, 256, 384)


def _backends(registry):
    names = [b for b in registry.usable()]
    if not CUDA:  # Triton on the CPU runs in the interpreter: far too slow to time
        names = [b for b in names if b != "triton"]
    return names


def _rand(*shape, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(device=DEV, dtype=DTYPE)
    return t.requires_grad_(requires_grad)


def _info(benchmark, **kw):
    benchmark.extra_info.update(device=str(DEV), dtype=str(DTYPE).replace("torch.", ""), **kw)


def _run(benchmark, fn, rounds=None):
    def call():
        out = fn()
        sync(DEV)
        return out
    call()  # warm-up (compilation, caches)
    if rounds:
        benchmark.pedantic(call, rounds=rounds, iterations=1)
    else:
        benchmark(call)


# ---- attention -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qkv():
    q, k, v, tq, tk, tv = (_rand(*ATT_SHAPE, seed=i) for i in range(6))
    return q, k, v, tq, tk, tv


@pytest.mark.parametrize("backend", _backends(ATTENTION))
def test_attention_forward(benchmark, qkv, backend):
    q, k, v = qkv[:3]
    _info(benchmark, op="attention", pass_="forward", backend=backend, shape=list(ATT_SHAPE))
    with fk.use_backend(backend), torch.no_grad():
        _run(benchmark, lambda: fk.attention(q, k, v))


@pytest.mark.parametrize("backend", _backends(ATTENTION))
def test_attention_forward_jvp(benchmark, qkv, backend):
    q, k, v, tq, tk, tv = qkv
    _info(benchmark, op="attention", pass_="forward+jvp", backend=backend, shape=list(ATT_SHAPE))
    with fk.use_backend(backend), torch.no_grad():
        _run(benchmark, lambda: fk.attention_jvp(q, k, v, tq, tk, tv))


@pytest.mark.parametrize("backend", _backends(ATTENTION))
def test_attention_backward_through_jvp(benchmark, qkv, backend):
    q, k, v, tq, tk, tv = (x.detach().clone().requires_grad_() for x in qkv)
    _info(benchmark, op="attention", pass_="backward through (O, tO)", backend=backend, shape=list(ATT_SHAPE))
    with fk.use_backend(backend):
        o, to = fk.attention_jvp(q, k, v, tq, tk, tv)
        go, gto = torch.randn_like(o), torch.randn_like(to)
        _run(benchmark, lambda: torch.autograd.grad((o, to), (q, k, v, tq, tk, tv), (go, gto), retain_graph=True))


# ---- fused primitives ------------------------------------------------------------------------------

def _primitive_cases():
    B, N, C = ROW_SHAPE
    x, tx = _rand(B, N, C, seed=10), _rand(B, N, C, seed=11)
    mod = [_rand(B, 1, C, seed=12 + i) * 0.1 for i in range(4)]
    w, tw = _rand(C, seed=20), _rand(C, seed=21)
    y, ty = _rand(B, N, C, seed=22), _rand(B, N, C, seed=23)
    W = _rand(4 * C, C, seed=24) / C ** 0.5
    bias = _rand(4 * C, seed=25)
    return {
        "modulated_layer_norm": ((x, mod[0], mod[1]), (tx, mod[2], mod[3]),
                                 lambda a, b, c: ops.modulated_layer_norm(a, b, c),
                                 lambda p, t: ops.modulated_layer_norm_jvp(p[0], p[1], p[2], t[0], t[1], t[2])),
        "rms_norm": ((x, w), (tx, tw), lambda a, b: ops.rms_norm(a, b),
                     lambda p, t: ops.rms_norm_jvp(p[0], p[1], t[0], t[1])),
        "gelu_tanh": ((x, w), (tx, tw), lambda a, b: ops.gelu_tanh(a, b),
                      lambda p, t: ops.gelu_tanh_jvp(p[0], p[1], t[0], t[1])),
        "gated_residual": ((x, mod[0], y), (tx, mod[1], ty), lambda a, b, c: ops.gated_residual(a, b, c),
                           lambda p, t: ops.gated_residual_jvp(p[0], p[1], p[2], t[0], t[1], t[2])),
        "linear": ((x, W, bias), (tx,), lambda a, b, c: ops.linear(a, b, c),
                   lambda p, t: ops.linear_jvp(p[0], p[1], p[2], t[0])),
    }


_CASES = [(op, b) for op in REGISTRIES for b in _backends(REGISTRIES[op])]


@pytest.fixture(scope="module")
def cases():
    return _primitive_cases()


@pytest.mark.parametrize("op,backend", _CASES)
def test_primitive_forward(benchmark, cases, op, backend):
    prim, _, fwd, _ = cases[op]
    _info(benchmark, op=op, pass_="forward", backend=backend, shape=list(ROW_SHAPE))
    with fk.use_backend(backend), torch.no_grad():
        _run(benchmark, lambda: fwd(*prim))


@pytest.mark.parametrize("op,backend", _CASES)
def test_primitive_forward_jvp(benchmark, cases, op, backend):
    prim, tan, _, jvp = cases[op]
    _info(benchmark, op=op, pass_="forward+jvp", backend=backend, shape=list(ROW_SHAPE))
    with fk.use_backend(backend), torch.no_grad():
        _run(benchmark, lambda: jvp(prim, tan))


@pytest.mark.parametrize("op,backend", _CASES)
def test_primitive_backward_through_jvp(benchmark, cases, op, backend):
    prim, tan, _, jvp = cases[op]
    prim = tuple(p.detach().clone().requires_grad_() for p in prim)
    tan = tuple(t.detach().clone().requires_grad_() for t in tan)
    _info(benchmark, op=op, pass_="backward through (y, ty)", backend=backend, shape=list(ROW_SHAPE))
    with fk.use_backend(backend):
        y, ty = jvp(prim, tan)
        gy, gt = torch.randn_like(y), torch.randn_like(ty)
        _run(benchmark, lambda: torch.autograd.grad((y, ty), prim + tan, (gy, gt), retain_graph=True))
