"""patch_layer_norm / set_flowmap_layer_norm / fk.nn.LayerNorm: under forward-mode AD, F.layer_norm's tangent and
its derivatives (a loss on the tangent, a JVP of the JVP) against LayerNorm written with mean / var ops in
float64; outside forward mode the original runs, bit for bit."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import flowmap_kernels as fk
from flowmap_kernels.integrations import (LayerNormFallbackWarning, install_layer_norm, is_layer_norm_installed,
                                          layer_norm_fallback_counts, patch_layer_norm, reset_layer_norm_fallbacks,
                                          set_flowmap_layer_norm, uninstall_layer_norm)
from tests.numerics import rel_err
from tests.reference import MeanVarLayerNorm, ref_layer_norm, with_mean_var_layer_norms_

ORIGINAL = F.layer_norm
F64 = torch.float64


@pytest.fixture(autouse=True)
def _clean_state():
    reset_layer_norm_fallbacks()
    yield
    assert not is_layer_norm_installed() and F.layer_norm is ORIGINAL


def _layer_norm(shape, affine, bias, seed=0):
    ln = torch.nn.LayerNorm(shape, elementwise_affine=affine, bias=bias, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ln.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return ln


def _tangent_loss_grads(module, x, tx, w, mode):
    """(y, ty, grads of sum(w ty) w.r.t. x and the module's parameters) with torch.func.jvp or forward_ad."""
    xx = x.clone().requires_grad_()
    if mode == "func.jvp":
        y, ty = torch.func.jvp(module, (xx,), (tx,))
    else:
        with fwAD.dual_level():
            y, ty = fwAD.unpack_dual(module(fwAD.make_dual(xx, tx)))
    params = list(module.parameters())
    grads = torch.autograd.grad((ty * w).sum(), [xx] + params, allow_unused=True, materialize_grads=True)
    return y, ty, grads


SHAPES = [((3, 5, 16), (16,)), ((2, 3, 4, 6), (4, 6)), ((7, 1), (1,)), ((0, 8), (8,))]


@pytest.mark.parametrize("mode", ["func.jvp", "forward_ad"])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("x_shape, shape", SHAPES, ids=str)
def test_loss_on_the_tangent_is_exact_under_the_patch(x_shape, shape, affine, bias, mode):
    ln = _layer_norm(shape, affine, bias)
    ref = with_mean_var_layer_norms_(copy.deepcopy(ln))
    g = torch.Generator().manual_seed(1)
    x, tx, w = (torch.randn(x_shape, generator=g, dtype=F64) for _ in range(3))
    want = _tangent_loss_grads(ref, x, tx, w, mode)
    with patch_layer_norm():
        got = _tangent_loss_grads(ln, x, tx, w, mode)
    assert layer_norm_fallback_counts() == {}
    for a, b in zip(got[:2] + tuple(got[2]), want[:2] + tuple(want[2])):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12


def test_jvp_of_the_jvp_is_exact_under_the_patch():
    """Forward over forward (the nested JVP of pytorch/pytorch#196700) through nn.LayerNorm."""
    ln = _layer_norm((8,), True, True)
    g = torch.Generator().manual_seed(2)
    x, u, v = (torch.randn(4, 8, generator=g, dtype=F64) for _ in range(3))

    def second(f):
        return torch.func.jvp(lambda a: torch.func.jvp(f, (a,), (u,))[1], (x,), (v,))[1]

    want = second(lambda a: ref_layer_norm(a, (8,), ln.weight, ln.bias))
    with patch_layer_norm():
        got = second(ln)
    assert rel_err(got, want) < 1e-12


def test_outside_forward_mode_the_original_runs_bit_for_bit():
    ln = _layer_norm((16,), True, True)
    x = torch.randn(3, 16, dtype=F64, requires_grad=True)
    with patch_layer_norm(), patch_layer_norm():  # nested
        assert F.layer_norm is not ORIGINAL and is_layer_norm_installed()
        y = ln(x)
        y16 = F.layer_norm(x.detach().bfloat16(), (16,))
    assert torch.equal(y, ORIGINAL(x, (16,), ln.weight, ln.bias))
    assert torch.equal(y16, ORIGINAL(x.detach().bfloat16(), (16,)))
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_input_with_float32_parameters_computes_in_float32(dtype):
    """F.layer_norm's mixed rule: 16-bit input, float32 weight and bias -> float32 math, output in the
    input's dtype; routed (no fallback), within one rounding of the float64 values."""
    ln = torch.nn.LayerNorm(32)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    g = torch.Generator().manual_seed(3)
    x, tx = (torch.randn(4, 32, generator=g).to(dtype) for _ in range(2))
    with patch_layer_norm():
        y, ty = torch.func.jvp(ln, (x,), (tx,))
    assert layer_norm_fallback_counts() == {} and y.dtype == ty.dtype == dtype
    w, b = ln.weight.detach().double(), ln.bias.detach().double()
    y64, ty64 = torch.func.jvp(lambda a: ref_layer_norm(a, (32,), w, b), (x.double(),), (tx.double(),))
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel_err(y, y64) < tol and rel_err(ty, ty64) < tol


def test_zero_normalised_elements_run_the_original():
    x, tx = torch.randn(2, 0), torch.randn(2, 0)
    with patch_layer_norm():
        y, ty = torch.func.jvp(lambda a: F.layer_norm(a, (0,)), (x,), (tx,))
    assert y.shape == ty.shape == (2, 0) and layer_norm_fallback_counts() == {}


def test_calls_layer_norm_rejects_raise_its_own_errors():
    x, tx = torch.randn(2, 8), torch.randn(2, 8)
    with patch_layer_norm():
        with pytest.raises(RuntimeError, match="normalized_shape"):
            torch.func.jvp(lambda a: F.layer_norm(a, (7,)), (x,), (tx,))
        with pytest.raises(RuntimeError):
            torch.func.jvp(lambda a: F.layer_norm(a, (8,), torch.ones(7)), (x,), (tx,))
    assert layer_norm_fallback_counts() == {}


class _Subclass(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_fall_back_with_one_warning():
    x = torch.randn(2, 8).as_subclass(_Subclass)
    with patch_layer_norm(), fwAD.dual_level(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            y = F.layer_norm(fwAD.make_dual(x, torch.randn(2, 8)), (8,))
    assert layer_norm_fallback_counts() == {"subclass": 2}
    assert [w.category for w in caught] == [LayerNormFallbackWarning]
    assert torch.allclose(fwAD.unpack_dual(y).primal, ORIGINAL(x.as_subclass(torch.Tensor), (8,)))


def test_set_flowmap_layer_norm_keeps_parameters_and_values():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Sequential(
        torch.nn.LayerNorm(8, elementwise_affine=False)), torch.nn.GELU()).double()
    ref = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_flowmap_layer_norm(model) == 2
    assert isinstance(model[1], fk.nn.LayerNorm) and isinstance(model[1], torch.nn.LayerNorm)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    x, tx = torch.randn(3, 8, dtype=F64), torch.randn(3, 8, dtype=F64)
    assert torch.equal(model(x), ref(x))
    mean_var = with_mean_var_layer_norms_(copy.deepcopy(ref))
    assert isinstance(mean_var[1], MeanVarLayerNorm)
    w = torch.randn(3, 8, dtype=F64)
    got = _tangent_loss_grads(model, x, tx, w, "func.jvp")
    want = _tangent_loss_grads(mean_var, x, tx, w, "func.jvp")
    assert all(rel_err(a, b) < 1e-12 for a, b in zip(got[2], want[2]))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        set_flowmap_layer_norm(lambda x: x)


def test_the_sdpa_patch_on_torch_nn_functional_leaves_the_layer_norm_patch_alone():
    """patch_sdpa(modules=[torch.nn.functional]) replaces that module's SDPA bindings only: the LayerNorm
    patch's router there is neither counted nor restored by it, whatever the order of entering and leaving."""
    sdpa = fk.patch_sdpa(modules=[F])
    install_layer_norm()
    router = F.layer_norm
    sdpa.__enter__()
    assert F.layer_norm is router
    uninstall_layer_norm()
    assert F.layer_norm is ORIGINAL and not is_layer_norm_installed()
    install_layer_norm()
    sdpa.__exit__(None, None, None)
    assert F.layer_norm is not ORIGINAL and not fk.integrations.is_installed()
    uninstall_layer_norm()
