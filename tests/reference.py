"""Independent float64 references shared by the test suite.

Written from the definitions, not from the package: math attention on explicit (B, H, Lq, Lk) scores,
its JVP by torch.func.jvp, and gradients by autograd. Every kernel path is compared with these (how: the
relative error and tolerances of tests/numerics.py). :func:`random_parameters_` makes a model comparison
non-trivial.
"""
from __future__ import annotations

import math

import torch


def ref_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """softmax(scale q k^T + mask) v in float64 with explicit scores; rows with no allowed key give 0."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    lq, lk = q.shape[2], k.shape[2]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            scores = scores + attn_mask.double()
    scores = torch.where(keep, scores, torch.tensor(float("-inf"), dtype=torch.float64))
    keep_row = torch.isfinite(scores).any(dim=-1, keepdim=True)
    safe = torch.where(keep_row, scores, torch.zeros_like(scores))
    probs = torch.exp(safe - safe.amax(dim=-1, keepdim=True))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = torch.where(keep_row & torch.isfinite(scores), probs, torch.zeros_like(probs))
    return torch.einsum("bhij,bhjd->bhid", probs, v)


def ref_jvp(q, k, v, tq, tk, tv, **kw):
    """(O, tO) of ref_attention by torch.func.jvp, in float64."""
    return torch.func.jvp(lambda a, b, c: ref_attention(a, b, c, **kw), (q.double(), k.double(), v.double()),
                          (tq.double(), tk.double(), tv.double()))


def loss_on_outputs(o: torch.Tensor, to: torch.Tensor, wo: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on both outputs, with fixed random weights (so no gradient is trivial)."""
    return (o.double() * wo).sum() + (to.double() * wt).sum() + 0.5 * (to.double() ** 2).sum()


def ref_grads(q, k, v, tq, tk, tv, wo, wt, **kw):
    """Gradients of loss_on_outputs with respect to (q, k, v, tq, tk, tv), float64 autograd."""
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, tq, tk, tv)]
    o, to = ref_jvp(*leaves, **kw)
    loss = loss_on_outputs(o, to, wo, wt)
    return (o.detach(), to.detach()), torch.autograd.grad(loss, leaves)


def jvp_of_jvp(fn, primals, inner, outer):
    """Forward-over-forward by nested torch.func.jvp: ((y, ty), (dy, dty)) where (y, ty) = jvp(fn) along
    ``inner`` and (dy, dty) their JVP along ``outer``."""
    return torch.func.jvp(lambda *xs: torch.func.jvp(fn, xs, tuple(inner)), tuple(primals), tuple(outer))


def ref_varlen(q, k, v, cu_q, cu_k, tangents=None, **kw):
    """Packed attention sequence by sequence: ref_attention (or ref_jvp along ``tangents``, a (tq, tk, tv)
    triple) of each sequence's (L, H, D) rows, float64, concatenated: O, or (O, tO). ``kw``: ref_attention's
    is_causal, scale, enable_gqa. A sequence with no query or no key gives zero rows. Differentiable in the
    inputs and the tangents."""
    outs, touts = [], []
    for i in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if a == b or c == d:
            outs.append(torch.zeros(b - a, q.shape[1], v.shape[2], dtype=torch.float64))
            touts.append(outs[-1])
            continue
        seq = [x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:d], v[c:d])]
        if tangents is None:
            outs.append(ref_attention(*seq, **kw)[0].transpose(0, 1))
        else:
            tseq = [t.transpose(0, 1).unsqueeze(0) for t in (tangents[0][a:b], tangents[1][c:d], tangents[2][c:d])]
            o, to = ref_jvp(*seq, *tseq, **kw)
            outs.append(o[0].transpose(0, 1))
            touts.append(to[0].transpose(0, 1))
    return (torch.cat(outs), torch.cat(touts)) if tangents is not None else torch.cat(outs)


def random_parameters_(module, generator, std: float):
    """Every parameter of ``module`` drawn from N(0, std^2) in its own dtype, in place, from ``generator`` (a
    torch.Generator, which the caller may go on drawing from, or an int seed); returns the module. Zero-initialised
    layers (adaLN-Zero, final projections, zero gates) would otherwise make a comparison trivial."""
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return module


def ref_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm from mean / var ops: its forward-mode tangent is differentiable to every order (PyTorch
    2.13's F.layer_norm tangent is not, see flowmap_kernels.integrations.layer_norm_patch)."""
    dims = tuple(range(-len(normalized_shape), 0))
    m = x.mean(dims, keepdim=True)
    v = ((x - m) ** 2).mean(dims, keepdim=True)
    y = (x - m) / torch.sqrt(v + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


class MeanVarLayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm computed by :func:`ref_layer_norm` (for a model's reference copy, see below)."""

    def forward(self, x):
        return ref_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def with_mean_var_layer_norms_(model):
    """Every nn.LayerNorm of ``model`` (and subclass without its own parameters layout, e.g. fk.nn.LayerNorm)
    computed from mean / var ops, in place; returns the model."""
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.__class__ = MeanVarLayerNorm
    return model
