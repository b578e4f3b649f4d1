"""The four attention kernels as torch custom ops, with fake (meta) implementations and FLOP formulas.

Each op takes the backend name and runs that backend's implementation (the "torch" blockwise module or
the Triton launchers), so that FlopCounterMode, torch.compile and the profiler see one op per pass
whatever backend runs. The ops carry no autograd formula of their own: the autograd.Functions in
``autograd.py`` own forward mode and the backward passes.

FLOP counts are the matrix products of the mathematics (recomputation inside a kernel not counted), so
they agree with what FlopCounterMode counts for the naive backend under autograd:
forward 2 products, backward 4, forward+JVP 6, backward through (O, tO) 12; a product of (Lq x K) by
(K x Lk) costs 2 Lq K Lk per (batch, query head).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .registry import ATTENTION

_LIB = "flowmap_kernels"


def _impl(backend: str):
    return ATTENTION.impls[backend].impl


@torch.library.custom_op(f"{_LIB}::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float,
                      backend: str) -> tuple[Tensor, Tensor]:
    """O (B, Hq, Lq, Dv) and the row log-sum-exp (B, Hq, Lq), float32 (float64 for float64 inputs)."""
    return _impl(backend).forward(q, k, v, mask, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                       mask: Optional[Tensor], causal: bool, scale: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV from dO."""
    return _impl(backend).backward(q, k, v, o, lse, do, mask, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_jvp_forward", mutates_args=())
def attention_jvp_forward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                          mask: Optional[Tensor], causal: bool, scale: float,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """O, tO, row log-sum-exp and row mu = rowsum(P * tS) (the last two in the accumulation dtype)."""
    return _impl(backend).jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_jvp_backward", mutates_args=())
def attention_jvp_backward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, o: Tensor,
                           to: Tensor, lse: Tensor, mu: Tensor, do: Optional[Tensor], dto: Tensor,
                           mask: Optional[Tensor], causal: bool, scale: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dQ, dK, dV, dtQ, dtK, dtV from dO (optional) and dtO."""
    return _impl(backend).jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)


def _o_like(q, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _rows(q):
    return q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@attention_forward.register_fake
def _(q, k, v, mask, causal, scale, backend):
    return _o_like(q, v), _rows(q)


# Fakes must report the strides the kernels produce: every backend returns contiguous tensors
# (torch.empty_like would copy the strides of a transposed input, and a compiled graph that views
# the result then fails at run time).
def _contiguous_like(x):
    return x.new_empty(x.shape)


@attention_backward.register_fake
def _(q, k, v, o, lse, do, mask, causal, scale, backend):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


@attention_jvp_forward.register_fake
def _(q, k, v, tq, tk, tv, mask, causal, scale, backend):
    return _o_like(q, v), _o_like(q, v), _rows(q), _rows(q)


@attention_jvp_backward.register_fake
def _(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale, backend):
    return tuple(_contiguous_like(x) for x in (q, k, v, tq, tk, tv))


def product_flops(q_shape, k_shape, v_shape, n_qk: int, n_pv: int) -> int:
    """FLOPs of n_qk products of the size of Q K^T and n_pv of the size of P V."""
    B, Hq, Lq, D = q_shape
    Lk, Dv = k_shape[-2], v_shape[-1]
    return 2 * B * Hq * Lq * Lk * (n_qk * D + n_pv * Dv)


@register_flop_formula(torch.ops.flowmap_kernels.attention_forward)
def _(q, k, v, *args, out_shape=None, **kwargs):
    return product_flops(q, k, v, 1, 1)  # S = Q K^T, O = P V


@register_flop_formula(torch.ops.flowmap_kernels.attention_backward)
def _(q, k, v, *args, out_shape=None, **kwargs):
    return product_flops(q, k, v, 2, 2)  # dQ, dK ; dP = dO V^T, dV


@register_flop_formula(torch.ops.flowmap_kernels.attention_jvp_forward)
def _(q, k, v, *args, out_shape=None, **kwargs):
    return product_flops(q, k, v, 3, 3)  # S, tQ K^T, Q tK^T ; P V, P tV, (P tS) V


@register_flop_formula(torch.ops.flowmap_kernels.attention_jvp_backward)
def _(q, k, v, *args, out_shape=None, **kwargs):
    return product_flops(q, k, v, 6, 6)  # two per forward+JVP product

