"""attention_jvp(..., tangent_dtype=torch.float32): float32 tangent outputs from 16-bit inputs, on every
backend (naive, torch, Triton in the interpreter).

The reference is the float64 JVP of the *rounded* 16-bit inputs, so what is left is the arithmetic of the
pass: a float32 tO only carries float32 accumulation error (Triton: the probabilities enter its tensor-core
products split into two 16-bit parts, 16 significant bits in bfloat16), a 16-bit tO also the rounding of
the probabilities and of tO itself (about 2^-9 relative in bfloat16, 2^-12 in float16), which the option
removes. Measured (bf16): torch 1.8e-7 vs 1.7e-3, Triton 2.2e-6 vs 2.3e-3.
"""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels as fk
from tests.attention.backend_env import BACKENDS, on_backend
from tests.attention.cases import Case
from tests.numerics import TOLERANCE, rel_err
from tests.reference import loss_on_outputs, ref_grads

CASES = [
    Case(q_len=37, kv_len=53, head_dim=40),
    Case(q_heads=4, kv_heads=2, q_len=33, kv_len=17, head_dim=16, causal=True, scale=0.37),
    Case(batch=1, q_len=29, kv_len=45, head_dim=24, v_head_dim=40, mask="bool_dead_rows"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_float32_tangent_output_from_16bit_inputs(case, dtype, backend):
    t = case.make(dtype, requires_grad=True)
    kw = case.kwargs
    names = ("q", "k", "v", "tq", "tk", "tv")
    (ro, rto), rgrads = ref_grads(*(t[n] for n in names), t["wo"], t["wt"], **kw)
    with on_backend(backend):
        o16, to16 = fk.attention_jvp(*(t[n] for n in names), **kw)
        o, to = fk.attention_jvp(*(t[n] for n in names), tangent_dtype=torch.float32, **kw)
        assert o.dtype == dtype and to.dtype == torch.float32 and to16.dtype == dtype
        # O as accurate as with a 16-bit tangent (Triton: its P V product also takes the split operands)
        assert rel_err(o, ro) <= 1.05 * rel_err(o16, ro) + 1e-6, (rel_err(o, ro), rel_err(o16, ro))
        err32, err16 = rel_err(to, rto), rel_err(to16, rto)
        assert err32 <= 1e-5, err32  # float32 accumulation (Triton: P split in two 16-bit parts, 2^-17)
        assert err16 >= 10 * err32, (err16, err32)  # the 16-bit rounding the option removes
        grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), [t[n] for n in names])
    for name, g, rg in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, rgrads):
        assert g.dtype == dtype, name
        assert rel_err(g, rg) <= TOLERANCE[dtype], (name, rel_err(g, rg))


def test_tangent_dtype_float32_is_a_no_op_for_float32_and_errors_name_the_argument():
    t = Case(q_len=9, kv_len=11, head_dim=8).make(torch.float32)
    args = [t[n] for n in ("q", "k", "v", "tq", "tk", "tv")]
    o, to = fk.attention_jvp(*args, tangent_dtype=torch.float32)
    o2, to2 = fk.attention_jvp(*args)
    assert to.dtype == torch.float32 and torch.equal(to, to2) and torch.equal(o, o2)
    with pytest.raises(ValueError, match=r"tangent_dtype: expected None or torch.float32 \(the inputs' dtype; a "
                                         r"float32 tO is for float16/bfloat16 inputs\), got torch.float16"):
        fk.attention_jvp(*args, tangent_dtype=torch.float16)
    t64 = Case(q_len=9, kv_len=11, head_dim=8).make(torch.float64)
    with pytest.raises(ValueError, match=r"tangent_dtype: expected None or torch.float64 .*a float32 tO is for "):
        fk.attention_jvp(*(t64[n] for n in ("q", "k", "v", "tq", "tk", "tv")), tangent_dtype=torch.float32)
    tb = Case(q_len=9, kv_len=11, head_dim=8).make(torch.bfloat16)
    with pytest.raises(ValueError, match=r"tangent_dtype: expected None, torch.bfloat16 \(the inputs' dtype\) or "
                                         r"torch.float32, got torch.float16"):
        fk.attention_jvp(*(tb[n] for n in ("q", "k", "v", "tq", "tk", "tv")), tangent_dtype=torch.float16)


def test_float32_tangent_under_vmap_and_compile():
    """The option travels with the problem: vmap folds it along, and a compiled call keeps the fused op
    with a float32 tangent (fake tensor of the right dtype)."""
    case = Case(q_len=10, kv_len=12, head_dim=8)
    ts = [case.make(torch.bfloat16) for _ in range(2)]
    stacked = [torch.stack([x[n] for x in ts]) for n in ("q", "k", "v", "tq", "tk", "tv")]
    with fk.use_backend("torch"):
        vo, vto = torch.func.vmap(lambda *a: fk.attention_jvp(*a, tangent_dtype=torch.float32))(*stacked)
        for i, x in enumerate(ts):
            o, to = fk.attention_jvp(*(x[n] for n in ("q", "k", "v", "tq", "tk", "tv")), tangent_dtype=torch.float32)
            assert vto.dtype == torch.float32 and rel_err(vto[i], to) < 1e-6 and rel_err(vo[i], o) < 1e-2
        f = torch.compile(lambda *a: fk.attention_jvp(*a, tangent_dtype=torch.float32), backend="eager",
                          fullgraph=True)
        co, cto = f(*(ts[0][n] for n in ("q", "k", "v", "tq", "tk", "tv")))
        o, to = fk.attention_jvp(*(ts[0][n] for n in ("q", "k", "v", "tq", "tk", "tv")), tangent_dtype=torch.float32)
        assert cto.dtype == torch.float32 and torch.equal(cto, to) and torch.equal(co, o)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[1:], ids=Case.id)
def test_float32_tangent_inputs_with_16bit_inputs(case, backend):
    """Float32 tq, tk, tv with bfloat16 q, k, v (a model's dual form under tangent_dtype=float32): the
    attention runs in float32, O rounded to bfloat16 once, tO float32 against the float64 JVP at the same
    values (float32 accuracy), and the gradients reach q, k, v in bfloat16 and the tangents in float32."""
    t = case.make(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    tang = [(t[n].double() + 0.01 * torch.randn(t[n].shape, generator=g, dtype=torch.float64)).float()
            for n in ("tq", "tk", "tv")]  # more than 8 significant bits
    leaves = [t[n].clone().requires_grad_() for n in ("q", "k", "v")] + [x.clone().requires_grad_() for x in tang]
    kw = case.kwargs
    (ro, rto), rgrads = ref_grads(*leaves, t["wo"], t["wt"], **kw)
    with on_backend(backend):
        o, to = fk.attention_jvp(*leaves, **kw)
        grads = torch.autograd.grad(loss_on_outputs(o, to, t["wo"], t["wt"]), leaves)
    assert o.dtype == torch.bfloat16 and to.dtype == torch.float32
    assert rel_err(o, ro) <= TOLERANCE[torch.bfloat16]
    assert rel_err(to, rto) <= 1e-5, rel_err(to, rto)
    for i, (gr, rg, x) in enumerate(zip(grads, rgrads, leaves)):
        assert gr.dtype == x.dtype
        assert rel_err(gr, rg) <= TOLERANCE[torch.bfloat16], (i, rel_err(gr, rg))
    # a float64 tangent, or a 16-bit tangent_dtype with float32 tangents, is an error naming the argument
    with pytest.raises(ValueError, match="tangent of key: expected dtype torch.bfloat16 or torch.float32"):
        fk.attention_jvp(*leaves[:3], tang[0], tang[1].double(), tang[2], **kw)
    with pytest.raises(ValueError, match="tangent_dtype: float32 tangents give a float32 tO"):
        fk.attention_jvp(*leaves, tangent_dtype=torch.bfloat16, **kw)
