"""The shared loss pieces in flowmap_kernels.methods._common: the minibatch marginal velocity."""
from __future__ import annotations

import pytest
import torch

from flowmap_kernels.methods._common import velocity
from tests.methods.helpers import marginal_velocity
from tests.numerics import TOLERANCE, rel_err

# tests.numerics.TOLERANCE: float32 -- the logits, (1 - s)^2 ||x0_i - x0_j||^2 / 2 s^2, reach ~1e3 here
# (measured worst 1.2e-6); bfloat16 -- eps - x0 and the output rounded to 8 bits, logits in float32 (4.2e-3)


def _batch(shape, dtype, n=33, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn((n, *shape), generator=g, dtype=torch.float64) * 1.5
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return [a.to(dtype) for a in (s, x0, eps)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2,), (1, 3, 5)], ids=["2d", "image-like"])
@pytest.mark.parametrize("labels", [False, True])
def test_batch_velocity_matches_the_empirical_posterior(shape, dtype, labels):
    s, x0, eps = _batch(shape, dtype)
    cond = torch.arange(x0.shape[0]) % 3 if labels else None
    u = velocity("batch", s, x0, eps, cond)
    x0d, ed, sd = x0.double(), eps.double(), s.double().reshape(-1, *[1] * len(shape))
    xsd = (1 - sd) * x0d + sd * ed  # x_s as the function defines it, in float64
    ref = marginal_velocity(xsd, s.double(), x0d, cond)
    assert u.dtype == dtype and u.shape == x0.shape and not u.requires_grad
    err = rel_err(u, ref)
    assert err < TOLERANCE[dtype], err
    if labels:  # the label mask is not a no-op
        assert float((u.double() - marginal_velocity(xsd, s.double(), x0d)).abs().max()) > 1e-3


def test_batch_velocity_limits():
    """s -> 0: the conditional velocity eps - x0 exactly (no 0/0); s = 1: eps - mean(x0)."""
    s, x0, eps = _batch((2,), torch.float64)
    zero = torch.zeros_like(s)
    u0 = velocity("batch", zero, x0, eps)
    assert torch.isfinite(u0).all() and torch.equal(u0, eps - x0)
    one = torch.ones_like(s)
    u1 = velocity("batch", one, x0, eps)
    assert torch.allclose(u1, eps - x0.mean(0), atol=1e-12)
    dup = x0[:1].expand_as(x0).contiguous()  # a one-point data set: marginal = conditional
    assert torch.allclose(velocity("batch", s, dup, eps), eps - dup, atol=1e-12)


def test_velocity_kinds():
    s, x0, eps = _batch((2,), torch.float64, n=4)
    assert torch.equal(velocity("conditional", s, x0, eps), eps - x0)
    with pytest.raises(ValueError, match="velocity: expected one of \\['conditional', 'batch'\\], got 'x'"):
        velocity("x", s, x0, eps)
