"""torch.autograd.gradcheck / gradgradcheck with every check on (forward AD, batched gradients, batched forward
gradients, forward-over-reverse, undefined gradients), float64, on the fused paths ("torch": blockwise attention,
fused PyTorch formulas for the primitives) against finite differences; and a Hessian-vector product by
torch.autograd.forward_ad over autograd.grad(create_graph=True) against torch.func's on plain PyTorch."""
import importlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck, gradgradcheck

import flowmap_kernels as fk
from flowmap_kernels import ops

from .reference import ref_attention

F64 = torch.float64


def _rand(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _cases():
    q, k, v = _rand(1, 4, 3, 5, seed=0), _rand(1, 2, 4, 5, seed=1), _rand(1, 2, 4, 3, seed=2)
    mask = _rand(1, 1, 3, 4, seed=3) > -0.5
    x, s, h = _rand(2, 3, 6, seed=4), _rand(2, 1, 6, seed=5), _rand(2, 1, 6, seed=6)
    w, b = _rand(4, 6, seed=7), _rand(4, seed=8)
    xv, kv, vv = _rand(5, 2, 4, seed=9), _rand(6, 1, 4, seed=10), _rand(6, 1, 4, seed=11)
    cu_q, cu_k = torch.tensor([0, 2, 5]), torch.tensor([0, 4, 6])
    return {
        "attention": (lambda q, k, v: fk.attention(q, k, v, enable_gqa=True), (q, k, v)),
        "attention_causal_mask": (lambda q, k, v: fk.attention(q, k, v, attn_mask=mask[..., :3, :], is_causal=False,
                                                               enable_gqa=True), (q, k, v)),
        "attention_causal": (lambda q, k, v: fk.attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v)),
        "attention_varlen": (lambda q, k, v: fk.attention_varlen(q, k, v, cu_q, cu_k, 3, 4, is_causal=True,
                                                                 enable_gqa=True), (xv, kv, vv)),
        "modulated_layer_norm": (ops.modulated_layer_norm, (x, h, s)),
        "rms_norm": (ops.rms_norm, (x, _rand(6, seed=12))),
        "layer_norm": (ops.layer_norm, (x, _rand(6, seed=15), _rand(6, seed=16))),
        "gelu_tanh": (ops.gelu_tanh, (x, _rand(6, seed=13))),
        "gated_residual": (ops.gated_residual, (x, s, _rand(2, 3, 6, seed=14))),
        "linear": (ops.linear, (x, w, b)),
    }


CASES = sorted(_cases())


@pytest.mark.parametrize("name", CASES)
def test_gradcheck_every_check(name):
    fn, args = _cases()[name]
    args = tuple(a.requires_grad_() for a in args)
    with fk.use_backend("torch"):
        assert gradcheck(fn, args, check_forward_ad=True, check_backward_ad=True, check_batched_grad=True,
                         check_batched_forward_grad=True, check_undefined_grad=True)


@pytest.mark.parametrize("name", CASES)
def test_gradgradcheck_reverse_and_forward_over_reverse(name):
    fn, args = _cases()[name]
    args = tuple(a.requires_grad_() for a in args)
    with fk.use_backend("torch"):
        assert gradgradcheck(fn, args, check_fwd_over_rev=True, check_rev_over_rev=True, check_batched_grad=True,
                             check_undefined_grad=True)


@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_hessian_vector_product_by_forward_ad_over_reverse(backend):
    """H u of a scalar loss on (O, tO) of attention and the primitives: forward_ad over autograd.grad with
    create_graph=True (the dual inputs unpacked by the fused ops) against torch.func.jvp of torch.func.grad on
    plain PyTorch."""
    q, k, v = _rand(1, 2, 5, 4, seed=20), _rand(1, 2, 7, 4, seed=21), _rand(1, 2, 7, 4, seed=22)
    u = [_rand(*a.shape, seed=30 + i) for i, a in enumerate((q, k, v))]
    w = _rand(4, 4, seed=40)

    def model(q, k, v, attention, linear, norm):
        return linear(norm(attention(q, k, v, is_causal=True)), w)

    def loss(q, k, v, **kw):
        return model(q, k, v, **kw).sin().sum()

    ours = dict(attention=fk.attention, linear=ops.linear, norm=ops.rms_norm)
    plain = dict(attention=ref_attention, linear=torch.nn.functional.linear,
                 norm=lambda x: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6))
    want = torch.func.jvp(torch.func.grad(lambda *a: loss(*a, **plain), argnums=(0, 1, 2)), (q, k, v), tuple(u))[1]
    leaves = [a.clone().requires_grad_() for a in (q, k, v)]
    with fk.use_backend(backend), fwAD.dual_level():
        duals = [fwAD.make_dual(a, t) for a, t in zip(leaves, u)]
        grads = torch.autograd.grad(loss(*duals, **ours), duals, create_graph=True)
        got = [fwAD.unpack_dual(g).tangent for g in grads]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_first_order_backward_inside_the_dual_level_runs_no_recomputation(monkeypatch):
    """A training step's loss.backward() inside the forward_ad level (no create_graph) stays first order: the
    naive recomputation that forward-over-reverse needs is never entered, and the gradients are exact."""
    autodiff, attention_autograd = (importlib.import_module(f"flowmap_kernels.{m}")
                                    for m in ("_autodiff", "attention.autograd"))

    def refuse(*args, **kwargs):
        raise AssertionError("the naive recomputation ran")
    q, k, v = (_rand(1, 2, 5, 4, seed=50 + i).requires_grad_() for i in range(3))
    x = _rand(1, 2, 5, 4, seed=60)

    def loss(attention, gelu, q, k, v, tq):
        with fwAD.dual_level():
            o, to = fwAD.unpack_dual(gelu(attention(fwAD.make_dual(q, tq), k, v)))
            value = (o.sin() + (to * x).cos()).sum()
            return torch.autograd.grad(value, (q, k, v))
    want = loss(ref_attention, lambda a: torch.nn.functional.gelu(a, approximate="tanh"), q, k, v, x)
    monkeypatch.setattr(autodiff, "jvp_of_vjp", refuse)
    monkeypatch.setattr(attention_autograd, "jvp_of_vjp", refuse)
    with fk.use_backend("torch"):
        got = loss(fk.attention, ops.gelu_tanh, q, k, v, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
