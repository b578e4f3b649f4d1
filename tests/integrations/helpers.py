"""Shared pieces of the integration tests: the SDPA-math reference under torch.func.jvp, a tiny model.

The reference never goes through flowmap_kernels: it is the model run with SDPA's math backend
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``), the only PyTorch SDPA with a forward-mode formula,
with the patch NOT installed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch.nn.attention import SDPBackend, sdpa_kernel

from flowmap_kernels.integrations import fallback_counts, is_installed, patch_sdpa, reset_fallbacks
from tests.numerics import rel_err  # noqa: F401  (re-exported for the tests)


def jvp_and_param_grads(fn, params, primals, tangents, *, math_backend=False):
    """(out, tangent_out, grads): torch.func.jvp of fn along tangents, and the gradients of
    L = sum(w * tangent_out) (w a fixed pseudo-random weight) with respect to ``params``.

    ``math_backend``: run inside sdpa_kernel(SDPBackend.MATH) (the reference; asserts the patch is off).
    """
    if math_backend:
        assert not is_installed(), "the reference must not run through the patch"
        with sdpa_kernel(SDPBackend.MATH):
            return jvp_and_param_grads(fn, params, primals, tangents)
    out, tout = torch.func.jvp(fn, primals, tangents)
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(tout.shape, generator=g, dtype=tout.dtype)
    loss = (w * tout).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return out.detach(), tout.detach(), grads


def patched_and_reference(fn, params, primals, tangents):
    """(got, ref): :func:`jvp_and_param_grads` under ``patch_sdpa()`` and on SDPA's math backend without it;
    asserts that no call inside the patch fell back to the original SDPA."""
    ref = jvp_and_param_grads(fn, params, primals, tangents, math_backend=True)
    reset_fallbacks()
    with patch_sdpa():
        got = jvp_and_param_grads(fn, params, primals, tangents)
    assert fallback_counts() == {}, fallback_counts()
    return got, ref


def errors(a_triplet, b_triplet) -> dict:
    """Relative errors of two ``jvp_and_param_grads`` results: output, tangent, and all parameter
    gradients as one vector (some parameters get an exactly-zero gradient, e.g. key biases under softmax
    shift invariance; their rounding noise has no meaningful relative error on its own)."""
    (oa, ta, ga), (ob, tb, gb) = a_triplet, b_triplet
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    return {"out": rel_err(oa, ob), "tangent": rel_err(ta, tb), "param_grads": rel_err(flat(ga), flat(gb))}


class GraphRecorder:
    """torch.compile backend like aot_eager (AOTAutograd graphs, no code generation) that keeps the code
    of every forward and backward graph it compiles in ``code``."""

    def __init__(self):
        self.code = []
        self.backend = aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

    def _keep(self, gm, _inputs):
        self.code.append(gm.code)
        return gm.forward


def max_rel_err(a_triplet, b_triplet) -> float:
    """Largest of :func:`errors`."""
    return max(errors(a_triplet, b_triplet).values())


class TinySDPAModel(nn.Module):
    """Two pre-norm attention blocks that call F.scaled_dot_product_attention directly (like many models).

    x (B, N, C) -> (B, N, C). The second block uses grouped-query attention (``enable_gqa``) and a causal
    mask, the first a padding bool mask when one is given, so several SDPA code paths are exercised.
    """

    def __init__(self, dim=24, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv1 = nn.Linear(dim, 3 * dim)
        self.q2 = nn.Linear(dim, dim)
        self.kv2 = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.out1, self.out2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _heads(self, x, h):
        B, N, _ = x.shape
        return x.view(B, N, h, -1).transpose(1, 2)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = self.qkv1(self.norm1(x)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(
            self._heads(q, self.heads), self._heads(k, self.heads), self._heads(v, self.heads), attn_mask=mask)
        x = x + self.out1(a.transpose(1, 2).reshape(B, N, C))
        h = self.norm2(x)
        k, v = self.kv2(h).chunk(2, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(
            self._heads(self.q2(h), self.heads), self._heads(k, self.kv_heads), self._heads(v, self.kv_heads),
            is_causal=True, scale=0.7 / math.sqrt(self.hd), enable_gqa=True)
        return x + self.out2(a.transpose(1, 2).reshape(B, N, C))
