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

from .._autodiff import acc_dtype
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
                          backend: str, tangent_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """O, tO, row log-sum-exp and row mu = rowsum(P * tS) (the last two in the accumulation dtype); tO in
    float32 with ``tangent_fp32`` (16-bit inputs), else in the inputs' dtype."""
    return _impl(backend).jvp_forward(q, k, v, tq, tk, tv, mask, causal, scale,
                                      tangent_dtype=torch.float32 if tangent_fp32 else None)


@torch.library.custom_op(f"{_LIB}::attention_jvp_backward", mutates_args=())
def attention_jvp_backward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor, o: Tensor,
                           to: Tensor, lse: Tensor, mu: Tensor, do: Optional[Tensor], dto: Tensor,
                           mask: Optional[Tensor], causal: bool, scale: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dQ, dK, dV, dtQ, dtK, dtV from dO (optional) and dtO."""
    return _impl(backend).jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_mask_backward", mutates_args=())
def attention_mask_backward(q: Tensor, k: Tensor, v: Tensor, tq: Optional[Tensor], tk: Optional[Tensor],
                            tv: Optional[Tensor], o: Tensor, to: Optional[Tensor], lse: Tensor, mu: Optional[Tensor],
                            do: Optional[Tensor], dto: Optional[Tensor], mask: Tensor, causal: bool,
                            scale: float) -> Tensor:
    """Gradient of a float mask (an additive bias) in its own shape, from dO and/or dtO (the tangent arguments
    None when only O was computed). One implementation for every backend: the blockwise PyTorch pass
    (:func:`flowmap_kernels.attention.blockwise.mask_backward`), memory linear in N plus the mask's size."""
    from . import blockwise
    return blockwise.mask_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale)


def _o_like(q, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _rows(q):
    return q.new_empty(q.shape[:-1], dtype=acc_dtype(q))


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
def _(q, k, v, tq, tk, tv, mask, causal, scale, backend, tangent_fp32=False):
    to = _o_like(q, v)
    return _o_like(q, v), to.float() if tangent_fp32 else to, _rows(q), _rows(q)


@attention_jvp_backward.register_fake
def _(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale, backend):
    return tuple(_contiguous_like(x) for x in (q, k, v, tq, tk, tv))


@attention_mask_backward.register_fake
def _(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, mask, causal, scale):
    return _contiguous_like(mask)


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



# ----------------------------------------------------------------------------------------------------
# Packed (variable-length) attention: the same four passes over sequences packed along the token dim.
# q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); cu_q, cu_k int32 (B + 1,) offsets;
# lse, mu (Hq, total_q). Backends: ``varlen_registry.ATTENTION_VARLEN`` (signatures in varlen_blockwise).
# ----------------------------------------------------------------------------------------------------
def _varlen_impl(backend: str):
    from .varlen_registry import ATTENTION_VARLEN
    return ATTENTION_VARLEN.impls[backend].impl


@torch.library.custom_op(f"{_LIB}::attention_varlen_forward", mutates_args=())
def attention_varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
                             max_k: int, causal: bool, scale: float, backend: str) -> tuple[Tensor, Tensor]:
    """O (total_q, Hq, Dv) and the row log-sum-exp (Hq, total_q), float32 (float64 for float64 inputs)."""
    return _varlen_impl(backend).varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_varlen_backward", mutates_args=())
def attention_varlen_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                              cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """dQ, dK, dV from dO."""
    return _varlen_impl(backend).varlen_backward(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_varlen_jvp_forward", mutates_args=())
def attention_varlen_jvp_forward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                                 cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, causal: bool, scale: float,
                                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """O, tO, row log-sum-exp and row mu = rowsum(P * tS) (the last two (Hq, total_q), accumulation dtype)."""
    return _varlen_impl(backend).varlen_jvp_forward(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale)


@torch.library.custom_op(f"{_LIB}::attention_varlen_jvp_backward", mutates_args=())
def attention_varlen_jvp_backward(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                                  o: Tensor, to: Tensor, lse: Tensor, mu: Tensor, do: Optional[Tensor],
                                  dto: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, causal: bool,
                                  scale: float, backend: str
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dQ, dK, dV, dtQ, dtK, dtV from dO (optional) and dtO."""
    return _varlen_impl(backend).varlen_jvp_backward(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k,
                                                     max_q, max_k, causal, scale)


def _varlen_rows(q):
    return q.new_empty((q.shape[1], q.shape[0]), dtype=acc_dtype(q))


@attention_varlen_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    return _o_like(q, v), _varlen_rows(q)


@attention_varlen_backward.register_fake
def _(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    return _contiguous_like(q), _contiguous_like(k), _contiguous_like(v)


@attention_varlen_jvp_forward.register_fake
def _(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    return _o_like(q, v), _o_like(q, v), _varlen_rows(q), _varlen_rows(q)


@attention_varlen_jvp_backward.register_fake
def _(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, causal, scale, backend):
    return tuple(_contiguous_like(x) for x in (q, k, v, tq, tk, tv))


def varlen_product_flops(q, k, v, cu_q, cu_k, max_k: int, n_qk: int, n_pv: int) -> int:
    """FLOPs of n_qk products of the size of Q_i K_i^T and n_pv of the size of P_i V_i, summed over the
    sequences: 2 Hq sum_i Lq_i Lk_i (n_qk D + n_pv Dv). Offsets that cannot be read (fake or meta
    tensors) give the bound total_q * max_k for sum_i Lq_i Lk_i."""
    _, Hq, D = q.shape
    Dv = v.shape[-1]
    try:
        qo, ko = cu_q.tolist(), cu_k.tolist()
        pairs = sum((qo[i + 1] - qo[i]) * (ko[i + 1] - ko[i]) for i in range(len(qo) - 1))
    except (RuntimeError, NotImplementedError):  # no data behind the offsets
        pairs = q.shape[0] * max_k
    return 2 * Hq * pairs * (n_qk * D + n_pv * Dv)


@register_flop_formula(torch.ops.flowmap_kernels.attention_varlen_forward, get_raw=True)
def _(q, k, v, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    return varlen_product_flops(q, k, v, cu_q, cu_k, max_k, 1, 1)


@register_flop_formula(torch.ops.flowmap_kernels.attention_varlen_backward, get_raw=True)
def _(q, k, v, o, lse, do, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    return varlen_product_flops(q, k, v, cu_q, cu_k, max_k, 2, 2)


@register_flop_formula(torch.ops.flowmap_kernels.attention_varlen_jvp_forward, get_raw=True)
def _(q, k, v, tq, tk, tv, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    return varlen_product_flops(q, k, v, cu_q, cu_k, max_k, 3, 3)


@register_flop_formula(torch.ops.flowmap_kernels.attention_varlen_jvp_backward, get_raw=True)
def _(q, k, v, tq, tk, tv, o, to, lse, mu, do, dto, cu_q, cu_k, max_q, max_k, *args, out_val=None, **kwargs):
    return varlen_product_flops(q, k, v, cu_q, cu_k, max_k, 6, 6)
