"""Row norms on huge finite rows: (x - mean)^2 overflows float32 for |x| > ~1.8e19 (float64 for |x| > ~1e154),
which gave r = 0, i.e. y = 0 or y = shift. Every backend now divides each row by a power of two above its
max |x| before squaring (exact; rows with max |x| <= 1 compute as before). Checked on every backend against
the float64 formulas of tests/ops/helpers.py: value, JVP along every input, gradients of a loss on (y, ty)
for every primal and tangent, and the explicit *_jvp forms. Rows with an inf or NaN give NaN exactly where
the float64 formula does. An empty channel dim (C = 0) is a ValueError naming x.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import flowmap_kernels.ops as ops
from flowmap_kernels import use_backend
from tests.numerics import TOLERANCE, rel_err
from tests.ops.helpers import EPS, check_op, make_inputs, ref_layer_norm, ref_modulated_layer_norm, ref_rms_norm

C = 72
BACKENDS = ["naive", "torch", "extension"]


def _cases(ref_scale: float = 1.0):
    """op name -> (op, float64 reference, shapes, explicit jvp). The reference sees x * ref_scale (a power of
    two, with eps scaled alike: the same function of x) so that float64 inputs near 1e160 do not overflow it."""
    def mln_ref(x, h, s):
        return ref_modulated_layer_norm(x * ref_scale, h, s, eps=EPS * ref_scale * ref_scale)

    def rms_ref(x, w):
        return ref_rms_norm(x * ref_scale, w, eps=EPS * ref_scale * ref_scale)

    def ln_ref(x, w, b):
        return ref_layer_norm(x * ref_scale, w, b, eps=EPS * ref_scale * ref_scale)

    return {
        "modulated_layer_norm": (
            ops.modulated_layer_norm, mln_ref, [(2, 3, C), (2, 1, C), (2, 1, C)],
            lambda x, h, s, tx, th, ts: ops.modulated_layer_norm_jvp(x, h, s, tx, th, ts)),
        "layer_norm": (
            lambda x, w, b: ops.layer_norm(x, w, b, eps=EPS), ln_ref, [(2, 3, C), (C,), (C,)],
            lambda x, w, b, tx, tw, tb: ops.layer_norm_jvp(x, w, b, tx, tw, tb, eps=EPS)),
        "rms_norm": (
            ops.rms_norm, rms_ref, [(2, 3, C), (C,)], lambda x, w, tx, tw: ops.rms_norm_jvp(x, w, tx, tw)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e37])
@pytest.mark.parametrize("name", ["modulated_layer_norm", "layer_norm", "rms_norm"])
def test_huge_rows_match_float64(name, magnitude, dtype, backend):
    op, ref, shapes, explicit = _cases()[name]
    prim, tang = make_inputs(shapes, dtype, seed=3, scale=[magnitude] + [0.5] * (len(shapes) - 1))
    assert torch.isfinite(prim[0]).all()
    with use_backend(backend):
        y = op(*prim)
        assert y.abs().amax() > 0.1  # was 0 (or just shift) before rows were scaled
        check_op(op, ref, prim, tang, dtype, explicit_jvp=explicit)


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("name", ["modulated_layer_norm", "layer_norm", "rms_norm"])
def test_huge_float64_rows(name, backend):
    """float64 squares overflow above ~1e154: rows near 1e160 (float64 runs on the PyTorch backends)."""
    op, ref, shapes, explicit = _cases(ref_scale=2.0 ** -540)[name]
    prim, tang = make_inputs(shapes, torch.float64, seed=4, scale=[1e160] + [0.5] * (len(shapes) - 1))
    with use_backend(backend):
        check_op(op, ref, prim, tang, torch.float64, explicit_jvp=explicit)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_every_magnitude_in_one_tensor(backend, dtype):
    """Each row is scaled on its own: tiny, unit and huge rows side by side, forward and JVP per row."""
    g = torch.Generator().manual_seed(5)
    mags = torch.tensor([1e-30, 1e-3, 1.0, 3.0, 1e19, 1e25, 1e36], dtype=torch.float64)
    x64 = torch.randn(len(mags), C, generator=g, dtype=torch.float64) * mags[:, None]
    tx64 = torch.randn(len(mags), C, generator=g, dtype=torch.float64) * mags[:, None]
    x, tx = x64.to(dtype), tx64.to(dtype)
    shift, scale = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    z = torch.zeros(C, dtype=dtype)
    xd = x.double()
    with use_backend(backend):
        y, ty = ops.modulated_layer_norm_jvp(x, shift, scale, tx, z, z)
        r, tr = ops.rms_norm_jvp(x, None, tx)
    ref_y, ref_ty = torch.func.jvp(lambda a: ref_modulated_layer_norm(a, shift.double(), scale.double()), (xd,),
                                   (tx.double(),))
    ref_r, ref_tr = torch.func.jvp(ref_rms_norm, (xd,), (tx.double(),))
    for got, want in ((y, ref_y), (ty, ref_ty), (r, ref_r), (tr, ref_tr)):
        row_err = [rel_err(a, b) for a, b in zip(got, want)]  # each row on its own scale
        assert max(row_err) <= TOLERANCE[dtype], row_err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_finite_rows_give_nan_where_float64_does(backend, dtype):
    x = torch.randn(4, C, generator=torch.Generator().manual_seed(6)).to(dtype)
    x[0, 3] = float("inf")
    x[1, 5] = float("-inf")
    x[2, 7] = float("nan")
    x[3] *= 1e30  # a finite huge row next to them stays finite
    with use_backend(backend):
        y = ops.modulated_layer_norm(x, torch.zeros(C, dtype=dtype), torch.zeros(C, dtype=dtype))
        r = ops.rms_norm(x)
    ref_y = F.layer_norm(x.double(), (C,), eps=EPS)
    ref_r = F.rms_norm(x.double(), (C,), eps=EPS)
    for got, want in ((y, ref_y), (r, ref_r)):
        assert torch.equal(got.isnan(), want.isnan())
        fin = ~want.isnan()
        assert torch.allclose(got.double()[fin], want[fin], atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.isfinite(y[3]).all() and y[3].abs().amax() > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", [
    lambda x, c: ops.modulated_layer_norm(x, c, c),
    lambda x, c: ops.modulated_layer_norm_jvp(x, c, c, x),
    lambda x, c: ops.rms_norm(x),
    lambda x, c: ops.rms_norm(x, c),
    lambda x, c: ops.rms_norm_jvp(x, None, x),
    lambda x, c: torch.func.jvp(lambda a: ops.rms_norm(a, c), (x,), (x,)),
], ids=["mln", "mln_jvp", "rms", "rms_weight", "rms_jvp", "rms_func_jvp"])
def test_empty_channel_dim_is_a_value_error(call, backend):
    x, c = torch.randn(2, 3, 0), torch.randn(0)
    with use_backend(backend), pytest.raises(ValueError, match=r"x: the normalized \(last\) dim has size 0"):
        call(x, c)


def test_scale_is_exact_power_of_two_and_unit_rows_unchanged():
    """The torch backend's row scale: 1 for rows with max |x| <= 1 or a non-finite entry, else a power of two
    2^-e with max |x| < 2^e."""
    from flowmap_kernels.ops.fused_torch import _row_inv_scale
    x = torch.tensor([[0.5, -1.0], [3.0, 1.0], [3e38, 1.0], [float("inf"), 2.0], [float("nan"), 5.0]])
    inv = _row_inv_scale(x).squeeze(-1)
    assert inv[0] == 1 and inv[1] == 0.25 and inv[2] == 2.0 ** -126 and inv[3] == 1 and inv[4] == 1
    e = torch.frexp(inv[:3]).exponent - 1
    assert torch.equal(inv[:3], torch.ldexp(torch.ones(3), e)) and math.isfinite(float(inv.sum()))
