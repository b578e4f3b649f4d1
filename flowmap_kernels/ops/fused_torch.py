"""The "torch" backend: the fused forward / JVP / backward formulas of every op in PyTorch eager.

These functions have exactly the signatures of the compiled kernels (``extension.py``) and compute the
same mathematics (``csrc/include/flowmap/*.h``) in float32 (float64 for float64 inputs), so they serve
float64 and installs without the extension. Layout (see ``problem.py``): ``x`` is (R, C) with unit
stride along C; a per-channel operand is a contiguous (M, C) table, row r using table row r // (R // M).
Gradients of a table come back as fp32 partial sums (R // rpc, C) over chunks of ``rpc`` consecutive rows
(the caller sums chunks of a group); ``rpc`` divides every group size.

Row norm (LayerNorm when ``center``, else RMSNorm), s = offset + scale (1 when scale is None):
    xh = (x - mean) * r,  r = rsqrt(var + eps)             y = xh * s + shift
    txh = r * (tx - mean(tx) - xh * w),  w = mean(xh * tx)  ty = txh * s + xh * tscale + tshift
    Jv = r * (v - mean(v) - xh * mean(v * xh))   (mean(v) only when centering; J is symmetric)
    backward through (y, ty) with gy, gt:  g_xh = gy * s + gt * tscale, g_txh = gt * s
    dtx = J g_txh,  dx = J(g_xh - r w g_txh) - r (mean(g_txh txh) xh + mean(g_txh xh) txh)
    dscale = gy xh + gt txh,  dshift = gy,  dtscale = gt xh,  dtshift = gt
stats: forward (R, 2) = [mean, r]; JVP forward (R, 4) = [mean, r, mean(tx), w] (fp32; fp64 for fp64).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._autodiff import acc_dtype as _acc

_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _f(t: Optional[Tensor], dt) -> Optional[Tensor]:
    return None if t is None else t.to(dt)


def _per_row(table: Optional[Tensor], R: int, dt) -> Optional[Tensor]:
    if table is None:
        return None
    M = table.shape[0]
    t = table.to(dt)
    return t if M == R else t.repeat_interleave(R // M, dim=0)


def _partial(contrib: Tensor, rpc: int) -> Tensor:
    R, C = contrib.shape
    return contrib.reshape(R // rpc, rpc, C).sum(1)


def _empty(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=_acc(x))


def _jmul(v: Tensor, xh: Tensor, r: Tensor, center: bool) -> Tensor:
    """J v for the row norm's Jacobian J = r (I - [center] 11^T / C - xh xh^T / C)."""
    out = v - xh * (v * xh).mean(-1, keepdim=True)
    if center:
        out = out - v.mean(-1, keepdim=True)
    return r * out


def _s(scale, R, offset, dt, x):
    s = _per_row(scale, R, dt)
    return torch.ones((), dtype=dt, device=x.device) * offset if s is None else s + offset


def _row_inv_scale(xf: Tensor) -> Tensor:
    """(R, 1): 2^-e with max|x| < 2^e for rows with 1 < max|x| < inf, else 1 (csrc rownorm.h's row scale).

    Squares of the scaled row cannot overflow, so huge finite rows normalise correctly; multiplying by a
    power of two is exact, and rows with max|x| <= 1 or a non-finite entry compute exactly as unscaled.
    """
    amax = xf.abs().amax(-1, keepdim=True)
    e = torch.frexp(amax).exponent.clamp(max=1022 if xf.dtype == torch.float64 else 126)  # 2^-e stays normal
    inv = torch.exp2(-e.to(xf.dtype))
    return torch.where((amax > 1) & torch.isfinite(amax), inv, torch.ones_like(amax))


def _row_stats(xf: Tensor, center: bool, eps: float):
    """mean, r = rsqrt(var + eps) and xh = (x - mean) r of (R, C) rows, computed on the row scaled by
    _row_inv_scale: xh = d r_s with d = x inv - mean_s, r_s = rsqrt(mean(d^2) + eps inv^2); mean = mean_s / inv,
    r = r_s inv."""
    inv = _row_inv_scale(xf)
    xs = xf * inv
    mean_s = xs.mean(-1, keepdim=True) if center else torch.zeros_like(inv)
    d = xs - mean_s
    r_s = torch.rsqrt((d * d).mean(-1, keepdim=True) + eps * inv * inv)
    return mean_s / inv, r_s * inv, d * r_s


def norm_forward(x, scale, shift, offset: float, center: bool, eps: float):
    dt = _acc(x)
    R = x.shape[0]
    mean, r, xh = _row_stats(x.to(dt), center, eps)
    y = xh * _s(scale, R, offset, dt, x)
    if shift is not None:
        y = y + _per_row(shift, R, dt)
    return y.to(x.dtype), torch.cat([mean, r], 1)


def norm_backward(x, scale, stats, gy, offset: float, center: bool, rpc: int, has_shift: bool):
    dt = _acc(x)
    R = x.shape[0]
    mean, r = stats[:, 0:1], stats[:, 1:2]
    xh = (x.to(dt) - mean) * r
    g = gy.to(dt)
    dx = _jmul(g * _s(scale, R, offset, dt, x), xh, r, center)
    dscale = _partial(g * xh, rpc) if scale is not None else _empty(x)
    dshift = _partial(g, rpc) if has_shift else _empty(x)
    return dx.to(x.dtype), dscale, dshift


def _jvp_row_terms(x, tx, stats, dt):
    mean, r, tmean, w = (stats[:, i:i + 1] for i in range(4))
    xh = (x.to(dt) - mean) * r
    txh = r * (tx.to(dt) - tmean - xh * w)
    return xh, txh, r, w


def norm_jvp_forward(x, tx, scale, shift, tscale, tshift, offset: float, center: bool, eps: float):
    dt = _acc(x)
    R = x.shape[0]
    xf, txf = x.to(dt), tx.to(dt)
    tmean = txf.mean(-1, keepdim=True) if center else torch.zeros(R, 1, dtype=dt, device=x.device)
    mean, r, xh = _row_stats(xf, center, eps)
    w = (xh * txf).mean(-1, keepdim=True)
    txh = r * (txf - tmean - xh * w)
    s = _s(scale, R, offset, dt, x)
    y, ty = xh * s, txh * s
    if scale is not None:
        ty = ty + xh * _per_row(tscale, R, dt)
    if shift is not None:
        y = y + _per_row(shift, R, dt)
        ty = ty + _per_row(tshift, R, dt)
    return y.to(x.dtype), ty.to(x.dtype), torch.cat([mean, r, tmean, w], 1)


def norm_jvp_backward(x, tx, scale, tscale, stats, gy, gt, offset: float, center: bool, rpc: int,
                      has_shift: bool):
    dt = _acc(x)
    R = x.shape[0]
    xh, txh, r, w = _jvp_row_terms(x, tx, stats, dt)
    gtf = gt.to(dt)
    gyf = torch.zeros_like(gtf) if gy is None else gy.to(dt)
    s = _s(scale, R, offset, dt, x)
    g_xh = gyf * s
    if scale is not None:
        g_xh = g_xh + gtf * _per_row(tscale, R, dt)
    g_txh = gtf * s
    dtx = _jmul(g_txh, xh, r, center)
    dx = (_jmul(g_xh - r * w * g_txh, xh, r, center)
          - r * ((g_txh * txh).mean(-1, keepdim=True) * xh + (g_txh * xh).mean(-1, keepdim=True) * txh))
    if scale is not None:
        dscale, dtscale = _partial(gyf * xh + gtf * txh, rpc), _partial(gtf * xh, rpc)
    else:
        dscale, dtscale = _empty(x), _empty(x)
    if has_shift:
        dshift, dtshift = _partial(gyf, rpc), _partial(gtf, rpc)
    else:
        dshift, dtshift = _empty(x), _empty(x)
    return dx.to(x.dtype), dtx.to(x.dtype), dscale, dshift, dtscale, dtshift


# ---- GELU (tanh approximation) with an optional bias: z = x + bias -------------------------------
#   y = 0.5 z (1 + tanh(u)),  u = k (z + a z^3)
#   y' = 0.5 (1 + t) + 0.5 z (1 - t^2) u',  u' = k (1 + 3 a z^2)
#   y'' = (1 - t^2) (u' + 0.5 z (6 k a z - 2 t u'^2))

def _gelu_parts(z):
    u = _K * (z + _A * z * z * z)
    t = torch.tanh(u)
    du = _K * (1.0 + 3.0 * _A * z * z)
    sech2 = 1.0 - t * t
    y = 0.5 * z * (1.0 + t)
    d1 = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
    d2 = sech2 * (du + 0.5 * z * (6.0 * _K * _A * z - 2.0 * t * du * du))
    return y, d1, d2


def _z(x, bias, dt):
    z = x.to(dt)
    return z if bias is None else z + bias.to(dt)


def gelu_forward(x, bias):
    y, _, _ = _gelu_parts(_z(x, bias, _acc(x)))
    return y.to(x.dtype)


def gelu_backward(x, bias, gy, rpc: int):
    dt = _acc(x)
    _, d1, _ = _gelu_parts(_z(x, bias, dt))
    dz = gy.to(dt) * d1
    return dz.to(x.dtype), (_partial(dz, rpc) if bias is not None else _empty(x))


def gelu_jvp_forward(x, tx, bias, tbias):
    dt = _acc(x)
    y, d1, _ = _gelu_parts(_z(x, bias, dt))
    tz = _z(tx, tbias, dt)
    return y.to(x.dtype), (d1 * tz).to(x.dtype)


def gelu_jvp_backward(x, tx, bias, tbias, gy, gt, rpc: int):
    dt = _acc(x)
    _, d1, d2 = _gelu_parts(_z(x, bias, dt))
    tz = _z(tx, tbias, dt)
    gtf = gt.to(dt)
    dz = gtf * tz * d2 if gy is None else gy.to(dt) * d1 + gtf * tz * d2
    dtz = gtf * d1
    if bias is not None:
        db, dtb = _partial(dz, rpc), _partial(dtz, rpc)
    else:
        db, dtb = _empty(x), _empty(x)
    return dz.to(x.dtype), dtz.to(x.dtype), db, dtb


# ---- gated residual: out = x + gate * y ---------------------------------------------------------
#   tout = tx + tgate * y + gate * ty;  dx = go, dtx = gto (identities, handled by the caller)
#   dy = go gate + gto tgate,  dty = gto gate,  dgate = go y + gto ty,  dtgate = gto y

def gated_forward(x, gate, y):
    dt = _acc(x)
    R = x.shape[0]
    return (x.to(dt) + _per_row(gate, R, dt) * y.to(dt)).to(x.dtype)


def gated_backward(gate, y, go, rpc: int):
    dt = _acc(y)
    R = y.shape[0]
    gof = go.to(dt)
    dy = gof * _per_row(gate, R, dt)
    return dy.to(y.dtype), _partial(gof * y.to(dt), rpc)


def gated_jvp_forward(x, tx, gate, tgate, y, ty):
    dt = _acc(x)
    R = x.shape[0]
    g, tg, yf = _per_row(gate, R, dt), _per_row(tgate, R, dt), y.to(dt)
    out = x.to(dt) + g * yf
    tout = tx.to(dt) + tg * yf + g * ty.to(dt)
    return out.to(x.dtype), tout.to(x.dtype)


def gated_jvp_backward(gate, tgate, y, ty, go, gto, rpc: int):
    dt = _acc(y)
    R = y.shape[0]
    g, tg, yf, tyf = _per_row(gate, R, dt), _per_row(tgate, R, dt), y.to(dt), ty.to(dt)
    gtof = gto.to(dt)
    gof = torch.zeros_like(gtof) if go is None else go.to(dt)
    dy = gof * g + gtof * tg
    dty = gtof * g
    return (dy.to(y.dtype), dty.to(y.dtype), _partial(gof * yf + gtof * tyf, rpc), _partial(gtof * yf, rpc))


def chunk_target(rows: int, device, groups: int = 1) -> int:
    """Rows per chunk of a reduction over rows: whole groups (PyTorch vectorises the rest)."""
    return max(1, rows)
