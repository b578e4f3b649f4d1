"""The fused kernels as torch custom ops (one op per pass), with fake implementations and FLOP formulas.

Each op takes the backend name ("torch" or "extension") and runs the function of the same name of the
implementation registered under that name in the op's registry (``registry.py``: ``fused_torch.py`` /
``extension.py``; signatures documented in ``fused_torch.py``), as ``attention/kernels.py`` does, so the profiler,
FlopCounterMode and torch.compile see one op per fused pass. Absent optional outputs are empty tensors.

FLOPs (FlopCounterMode): the row-wise ops count 0 (as for every elementwise aten op). The linear JVP ops
count exactly their matrix products: forward+JVP one product on the stacked [x; tx] (2 * 2R * K * N) plus
x tW^T only when a weight tangent is given; the backward through (y, ty) 2 * 2R * N * K for [gy; gt] W,
the same for dW = [gy; gt]^T [x; tx], plus gt tW and gt^T x only when the weight has a tangent.
In the backward through (y, ty) the gradient of the primal output may be None (zero; nothing is read).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .._autodiff import acc_dtype as _acc
from .registry import GATED_RESIDUAL, GELU_TANH, MODULATED_LAYER_NORM

_LIB = "flowmap_kernels"


# The registry each family of passes is looked up in (the norm passes serve modulated_layer_norm and rms_norm,
# whose registries hold the same implementations).
_REGISTRY_OF = {"norm": MODULATED_LAYER_NORM, "gelu": GELU_TANH, "gated": GATED_RESIDUAL}


def _impl(backend: str, fused_pass: str):
    """The function ``fused_pass`` (e.g. "norm_forward") of the implementation registered under ``backend``."""
    entry = _REGISTRY_OF[fused_pass.split("_")[0]].impls.get(backend)
    fn = None if entry is None else getattr(entry.impl, fused_pass, None)
    if fn is None:
        raise ValueError(f"backend: {backend!r} has no fused kernels")
    return fn


# ---- row norm --------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::norm_forward", mutates_args=())
def norm_forward(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], offset: float, center: bool,
                 eps: float, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, "norm_forward")(x, scale, shift, offset, center, eps)


@torch.library.custom_op(f"{_LIB}::norm_backward", mutates_args=())
def norm_backward(x: Tensor, scale: Optional[Tensor], stats: Tensor, gy: Tensor, offset: float, center: bool,
                  rpc: int, has_shift: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, "norm_backward")(x, scale, stats, gy, offset, center, rpc, has_shift)


@torch.library.custom_op(f"{_LIB}::norm_jvp_forward", mutates_args=())
def norm_jvp_forward(x: Tensor, tx: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                     tscale: Optional[Tensor], tshift: Optional[Tensor], offset: float, center: bool, eps: float,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(backend, "norm_jvp_forward")(x, tx, scale, shift, tscale, tshift, offset, center, eps)


@torch.library.custom_op(f"{_LIB}::norm_jvp_backward", mutates_args=())
def norm_jvp_backward(x: Tensor, tx: Tensor, scale: Optional[Tensor], tscale: Optional[Tensor], stats: Tensor,
                      gy: Optional[Tensor], gt: Tensor, offset: float, center: bool, rpc: int, has_shift: bool,
                      backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend, "norm_jvp_backward")(x, tx, scale, tscale, stats, gy, gt, offset, center, rpc, has_shift)


def _partial_fake(x, rpc, present):
    if not present:
        return x.new_empty((0,), dtype=_acc(x))
    return x.new_empty((x.shape[0] // rpc, x.shape[1]), dtype=_acc(x))


@norm_forward.register_fake
def _(x, scale, shift, offset, center, eps, backend):
    return torch.empty_like(x), x.new_empty((x.shape[0], 2), dtype=_acc(x))


@norm_backward.register_fake
def _(x, scale, stats, gy, offset, center, rpc, has_shift, backend):
    return torch.empty_like(x), _partial_fake(x, rpc, scale is not None), _partial_fake(x, rpc, has_shift)


@norm_jvp_forward.register_fake
def _(x, tx, scale, shift, tscale, tshift, offset, center, eps, backend):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty((x.shape[0], 4), dtype=_acc(x))


@norm_jvp_backward.register_fake
def _(x, tx, scale, tscale, stats, gy, gt, offset, center, rpc, has_shift, backend):
    s, h = _partial_fake(x, rpc, scale is not None), _partial_fake(x, rpc, has_shift)
    return torch.empty_like(x), torch.empty_like(x), s, h, s.clone(), h.clone()


# ---- GELU ------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::gelu_forward", mutates_args=())
def gelu_forward(x: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return _impl(backend, "gelu_forward")(x, bias)


@torch.library.custom_op(f"{_LIB}::gelu_backward", mutates_args=())
def gelu_backward(x: Tensor, bias: Optional[Tensor], gy: Tensor, rpc: int, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, "gelu_backward")(x, bias, gy, rpc)


@torch.library.custom_op(f"{_LIB}::gelu_jvp_forward", mutates_args=())
def gelu_jvp_forward(x: Tensor, tx: Tensor, bias: Optional[Tensor], tbias: Optional[Tensor],
                     backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, "gelu_jvp_forward")(x, tx, bias, tbias)


@torch.library.custom_op(f"{_LIB}::gelu_jvp_backward", mutates_args=())
def gelu_jvp_backward(x: Tensor, tx: Tensor, bias: Optional[Tensor], tbias: Optional[Tensor], gy: Optional[Tensor],
                      gt: Tensor, rpc: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend, "gelu_jvp_backward")(x, tx, bias, tbias, gy, gt, rpc)


@gelu_forward.register_fake
def _(x, bias, backend):
    return torch.empty_like(x)


@gelu_backward.register_fake
def _(x, bias, gy, rpc, backend):
    return torch.empty_like(x), _partial_fake(x, rpc, bias is not None)


@gelu_jvp_forward.register_fake
def _(x, tx, bias, tbias, backend):
    return torch.empty_like(x), torch.empty_like(x)


@gelu_jvp_backward.register_fake
def _(x, tx, bias, tbias, gy, gt, rpc, backend):
    p = _partial_fake(x, rpc, bias is not None)
    return torch.empty_like(x), torch.empty_like(x), p, p.clone()


# ---- gated residual --------------------------------------------------------------------------------
@torch.library.custom_op(f"{_LIB}::gated_forward", mutates_args=())
def gated_forward(x: Tensor, gate: Tensor, y: Tensor, backend: str) -> Tensor:
    return _impl(backend, "gated_forward")(x, gate, y)


@torch.library.custom_op(f"{_LIB}::gated_backward", mutates_args=())
def gated_backward(gate: Tensor, y: Tensor, go: Tensor, rpc: int, backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, "gated_backward")(gate, y, go, rpc)


@torch.library.custom_op(f"{_LIB}::gated_jvp_forward", mutates_args=())
def gated_jvp_forward(x: Tensor, tx: Tensor, gate: Tensor, tgate: Tensor, y: Tensor, ty: Tensor,
                      backend: str) -> tuple[Tensor, Tensor]:
    return _impl(backend, "gated_jvp_forward")(x, tx, gate, tgate, y, ty)


@torch.library.custom_op(f"{_LIB}::gated_jvp_backward", mutates_args=())
def gated_jvp_backward(gate: Tensor, tgate: Tensor, y: Tensor, ty: Tensor, go: Optional[Tensor], gto: Tensor, rpc: int,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _impl(backend, "gated_jvp_backward")(gate, tgate, y, ty, go, gto, rpc)


@gated_forward.register_fake
def _(x, gate, y, backend):
    return torch.empty_like(x)


@gated_backward.register_fake
def _(gate, y, go, rpc, backend):
    return torch.empty_like(y), _partial_fake(y, rpc, True)


@gated_jvp_forward.register_fake
def _(x, tx, gate, tgate, y, ty, backend):
    return torch.empty_like(x), torch.empty_like(x)


@gated_jvp_backward.register_fake
def _(gate, tgate, y, ty, go, gto, rpc, backend):
    p = _partial_fake(y, rpc, True)
    return torch.empty_like(y), torch.empty_like(y), p, p.clone()


# ---- linear under JVP: one product on the stacked [x; tx] ------------------------------------------
@torch.library.custom_op(f"{_LIB}::linear_jvp_forward", mutates_args=())
def linear_jvp_forward(x: Tensor, tx: Tensor, weight: Tensor, bias: Optional[Tensor], tweight: Optional[Tensor],
                       tbias: Optional[Tensor]) -> Tensor:
    """x, tx (R, K); weight, tweight (N, K) -> stacked [y; ty] (2R, N)."""
    R = x.shape[0]
    out = torch.mm(torch.cat([x, tx], 0), weight.t())
    if bias is not None:
        out[:R].add_(bias)
    if tweight is not None:
        out[R:].addmm_(x, tweight.t())
    if tbias is not None:
        out[R:].add_(tbias)
    return out


@torch.library.custom_op(f"{_LIB}::linear_jvp_backward", mutates_args=())
def linear_jvp_backward(x: Tensor, tx: Tensor, weight: Tensor, tweight: Optional[Tensor], gy: Tensor, gt: Tensor,
                        need_tweight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked [dx; dtx] (2R, K), dW (N, K), dtW (N, K) (empty unless need_tweight_grad)."""
    R = x.shape[0]
    g = torch.cat([gy, gt], 0)
    dxs = torch.mm(g, weight)
    if tweight is not None:
        dxs[:R].addmm_(gt, tweight)
    dw = torch.mm(g.t(), torch.cat([x, tx], 0))
    dtw = torch.mm(gt.t(), x) if need_tweight_grad else weight.new_empty((0,))
    return dxs, dw, dtw


@linear_jvp_forward.register_fake
def _(x, tx, weight, bias, tweight, tbias):
    return x.new_empty((2 * x.shape[0], weight.shape[0]))


@linear_jvp_backward.register_fake
def _(x, tx, weight, tweight, gy, gt, need_tweight_grad):
    dtw = torch.empty_like(weight) if need_tweight_grad else weight.new_empty((0,))
    return x.new_empty((2 * x.shape[0], x.shape[1])), torch.empty_like(weight), dtw


def linear_jvp_forward_flops(x_shape, w_shape, has_tweight: bool) -> int:
    R, K = x_shape
    N = w_shape[0]
    return 2 * (2 * R) * K * N + (2 * R * K * N if has_tweight else 0)


def linear_jvp_backward_flops(x_shape, w_shape, has_tweight: bool, need_tweight_grad: bool) -> int:
    R, K = x_shape
    N = w_shape[0]
    return (2 * (2 * R) * N * K * 2 + (2 * R * N * K if has_tweight else 0)
            + (2 * N * R * K if need_tweight_grad else 0))


@register_flop_formula(torch.ops.flowmap_kernels.linear_jvp_forward)
def _(x, tx, weight, bias, tweight, tbias, *args, out_shape=None, **kwargs):
    return linear_jvp_forward_flops(x, weight, tweight is not None)


@register_flop_formula(torch.ops.flowmap_kernels.linear_jvp_backward)
def _(x, tx, weight, tweight, gy, gt, need_tweight_grad, *args, out_shape=None, **kwargs):
    return linear_jvp_backward_flops(x, weight, tweight is not None, need_tweight_grad)
