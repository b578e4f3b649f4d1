"""The ring's merge of per-key-block partials and its per-block backward, in one process (no group):
split the keys into blocks, run the fused kernels on each block, merge (O, tO, lse, mu) with the ring's
formula, and compare with the float64 reference; then the backward kernels called per block with the
*merged* O, tO, lse, mu must sum to the full gradients."""
from __future__ import annotations

import pytest
import torch

from flowmap_kernels.attention import kernels
from flowmap_kernels.distributed.ring import _merge
from tests.numerics import TOLERANCE, rel_err
from tests.reference import ref_grads

TOL = TOLERANCE[torch.float64]


@pytest.mark.parametrize("bounds,mask_kind,gqa", [((0, 5, 6, 19), None, False), ((0, 9, 19), "bool_dead", True),
                                                   ((0, 1, 12, 19), "float", False)])
def test_blockwise_merge_and_backward_match_reference(bounds, mask_kind, gqa):
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2 if gqa else 4, 7, bounds[-1], 8, 6
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v, tq, tk, tv = r(B, Hq, Lq, D), r(B, Hkv, Lk, D), r(B, Hkv, Lk, Dv), r(B, Hq, Lq, D), r(B, Hkv, Lk, D), \
        r(B, Hkv, Lk, Dv)
    wo, wt = r(B, Hq, Lq, Dv), r(B, Hq, Lq, Dv)
    mask = None
    if mask_kind == "bool_dead":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.5
        mask[:, :, 2] = False  # no key at all for row 2
        mask[:, :, 3, :bounds[1]] = False  # row 3 sees nothing in the first block
    elif mask_kind == "float":
        mask = r(1, Hq, Lq, Lk)
    kw = dict(attn_mask=mask) if mask is not None else {}
    (ro, rto), rgrads = ref_grads(q, k, v, tq, tk, tv, wo, wt, **kw)
    scale = D ** -0.5
    blocks = list(zip(bounds[:-1], bounds[1:]))
    state = None
    for a, b in blocks:
        bm = None if mask is None else mask[..., a:b]
        state = _merge(state, kernels.attention_jvp_forward(q, k[:, :, a:b], v[:, :, a:b], tq, tk[:, :, a:b],
                                                            tv[:, :, a:b], bm, False, scale, "torch"), True)
    o, to, lse, mu = state
    assert rel_err(o, ro) < TOL and rel_err(to, rto) < TOL
    # gradients of loss_on_outputs: dO = wo, dtO = wt + tO
    do, dto = wo, wt + to
    dq, dtq = torch.zeros_like(q), torch.zeros_like(q)
    dkv = [[], [], [], []]
    for a, b in blocks:
        bm = None if mask is None else mask[..., a:b]
        gq, gk, gv, gtq, gtk, gtv = kernels.attention_jvp_backward(
            q, k[:, :, a:b], v[:, :, a:b], tq, tk[:, :, a:b], tv[:, :, a:b], o, to, lse, mu, do, dto, bm, False,
            scale, "torch")
        dq, dtq = dq + gq, dtq + gtq
        for acc, x in zip(dkv, (gk, gv, gtk, gtv)):
            acc.append(x)
    got = [dq, torch.cat(dkv[0], 2), torch.cat(dkv[1], 2), dtq, torch.cat(dkv[2], 2), torch.cat(dkv[3], 2)]
    errs = [rel_err(a, b) for a, b in zip(got, rgrads)]
    assert max(errs) < TOL, errs
    # sanity of the check itself: a merge that drops the weights' tangent term is wrong
    o2, to2 = torch.zeros_like(o), torch.zeros_like(to)
    for a, b in blocks:
        bm = None if mask is None else mask[..., a:b]
        po, pto, plse, _ = kernels.attention_jvp_forward(q, k[:, :, a:b], v[:, :, a:b], tq, tk[:, :, a:b],
                                                         tv[:, :, a:b], bm, False, scale, "torch")
        w = torch.exp(plse - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse))[..., None]
        o2, to2 = o2 + w * po, to2 + w * pto
    assert rel_err(o2, ro) < TOL and rel_err(to2, rto) > 1e-3
