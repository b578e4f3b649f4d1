"""The autodiff plumbing's contracts with PyTorch (``flowmap_kernels/_autodiff.py``): results under no_grad,
forward-AD levels that end and are entered again, and the per-thread tangent_grad switch."""
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flowmap_kernels as fk
from flowmap_kernels import func as fk_func
from flowmap_kernels import ops

F64 = torch.float64


def _rand(*shape, seed, requires_grad=False):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return t.requires_grad_(requires_grad)


OPS = {"attention": lambda a: fk.attention(a, a, a), "gelu_tanh": ops.gelu_tanh, "rms_norm": ops.rms_norm,
       "linear": lambda a: ops.linear(a, torch.ones(3, a.shape[-1], dtype=a.dtype))}


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_jvp_under_no_grad_gives_plain_results(op, backend):
    """torch.func.jvp inside torch.no_grad with an operand that requires grad (a parameter): the results
    neither require grad nor refuse in-place ops, as torch's own ops' (a custom Function applied there would
    return leaves that require grad)."""
    x = _rand(1, 2, 5, 4, seed=0, requires_grad=True)
    with fk.use_backend(backend), torch.no_grad():
        y, ty = torch.func.jvp(OPS[op], (x,), (_rand(1, 2, 5, 4, seed=1),))
    assert not y.requires_grad and not ty.requires_grad
    y.mul_(2)
    ty.mul_(2)


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_gradient_in_a_later_dual_level_carries_no_tangent(backend):
    """A graph built in one forward_ad level, differentiated with create_graph=True inside a later level (PyTorch
    reuses the level's index): the gradients carry no tangent of the old level, as with torch's ops."""
    x, q = _rand(2, 3, 8, seed=2, requires_grad=True), _rand(1, 2, 5, 4, seed=3, requires_grad=True)
    with fk.use_backend(backend):
        with fwAD.dual_level():
            y = ops.gelu_tanh(fwAD.make_dual(x, _rand(2, 3, 8, seed=4)))
            o = fk.attention(fwAD.make_dual(q, _rand(1, 2, 5, 4, seed=5)), q.detach(), q.detach())
            loss = sum(t.square().sum() for d in (y, o) for t in fwAD.unpack_dual(d)[:2])
        with fwAD.dual_level():
            grads = torch.autograd.grad(loss, (x, q), create_graph=True)
            assert all(fwAD.unpack_dual(g).tangent is None for g in grads)


def test_tangent_grad_false_stays_in_its_thread():
    """fk.func.jvp(..., tangent_grad=False) in one thread leaves another thread's explicit JVPs differentiable,
    (the switch is per thread, as the backend selection)."""
    inside, release = threading.Event(), threading.Event()

    class Waits(torch.nn.Module):
        def forward(self, x):
            return ops.gelu_tanh(x)

        def forward_jvp(self, x, tx):
            out = ops.gelu_tanh_jvp(x, None, tx)
            inside.set()
            release.wait(timeout=60)
            return out

    x = _rand(4, 8, seed=6)
    other = threading.Thread(target=lambda: fk_func.jvp(Waits(), (x,), (x,), tangent_grad=False))
    other.start()
    try:
        assert inside.wait(timeout=60)
        with fk.use_backend("torch"):
            _, ty = ops.gelu_tanh_jvp(x, None, _rand(4, 8, seed=7, requires_grad=True))
        assert ty.requires_grad
    finally:
        release.set()
        other.join()


def test_forward_ad_after_torch_func_jvp():
    """torch.func.jvp enters forward_ad levels of its own, whose tensors must not be kept: a later forward_ad
    computation (with a gradient of its result) works and is exact."""
    q, tq = _rand(1, 2, 5, 4, seed=8, requires_grad=True), _rand(1, 2, 5, 4, seed=9)
    with fk.use_backend("torch"):
        _, want = torch.func.jvp(lambda a: fk.attention(a, a, a), (q,), (tq,))
        with fwAD.dual_level():
            d = fwAD.make_dual(q, tq)
            out = fk.attention(d, d, d)
            (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
            got = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert g.shape == q.shape
