"""torch.autograd.Functions of the DiT primitives (setup_context style).

Each op has a primal Function whose ``jvp`` rule calls a second Function returning ``(y, ty)`` from one
fused pass; that Function's backward runs one fused pass through both outputs and returns gradients for
every primal and tangent input, so the tangent is differentiable (reverse-over-forward). Every backward
runs its fused kernels through ``_autodiff.differentiable_backward`` (as attention's PrimalBackward /
JVPBackward do): the gradients are themselves differentiable (create_graph=True, torch.func.grad over jvp,
forward-over-reverse) through a recomputation in the naive formulas that runs only when a second
derivative is taken. Tangents that are None are zero; a zero weight tangent is never multiplied.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .._autodiff import (differentiable_backward, forward_over_forward, jvp_by_reverse, record_tangent_output,
                         redual_saved, vmap_by_example, without_jvp, zeros_if_none)
from . import kernels as K
from . import naive
from .problem import ElementwiseProblem, NormProblem, OperandLayout, rows_view


def _output(t, shape):
    """``t`` in ``shape`` as a Function output that is not a view to autograd (``aten._unsafe_view``, as torch's
    own composite ops return theirs): views made inside a Function's forward forbid in-place ops on its outputs
    (``y = linear(x); y += r``), which every torch op allows."""
    return torch.ops.aten._unsafe_view(t, shape)


def _table_grad(p, layout: Optional[OperandLayout], R: int, rpc: int, dtype):
    """Chunk partial sums (R // rpc, C) -> the operand's gradient in its own shape and dtype."""
    if layout is None or p is None or p.dim() != 2:  # absent operands come back as (0,) placeholders
        return None
    M, C = layout.rows, p.shape[-1]
    if R == 0:  # empty batch: nothing contributes
        return layout.grad(p.new_zeros(M, C)).to(dtype)
    per = (R // M) // rpc if M else 1
    g = p.reshape(M, per, C).sum(1) if per > 1 else p.reshape(M, C)
    return layout.grad(g).to(dtype)


def _rows_opt(g):
    """An output gradient as (R, C) rows, or None (zero: the kernels then read nothing)."""
    return None if g is None else rows_view(g)


def _tab(layout, m):
    return None if m is None else layout.table(m)


def _keep(ctx, problem, saved, forward=(), stats=None) -> None:
    """setup_context of the row-op Functions: the problem, the tensors the backward (``saved``, then the
    statistics) and the jvp rule (``forward``) read; statistics are outputs without gradient."""
    ctx.cfg = problem
    ctx.save_for_backward(*saved, *(() if stats is None else (stats,)))
    if forward:
        ctx.save_for_forward(*forward)
    if stats is not None:
        ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _naive_jvp(fn, operands: int):
    """(y, ty) of ``fn`` as a function of its operands followed by their tangents (None = zero), in reverse mode
    only (:func:`jvp_by_reverse`), so that the jvp rules below can differentiate it again inside a forward-AD
    level, where a nested torch.func.jvp is not supported."""
    def both(*args):
        primals, tangents = args[:operands], args[operands:]
        return fn(*primals), jvp_by_reverse(fn, primals, tangents)[0]
    return both


# ---- the first-order fused passes (shared by each primal Function and its JVP Function's backward) ----------

def _norm_grads(x, scale, shift, gy, stats, cfg: NormProblem):
    """(dx, dscale, dshift) of the row norm from its output gradient; ``stats`` = [mean, r] rows."""
    dx, ds, dh = K.norm_backward(rows_view(x), _tab(cfg.scale_layout, scale), stats, rows_view(gy), cfg.offset,
                                 cfg.center, cfg.rpc, shift is not None, cfg.backend)
    return (dx.view(x.shape), _table_grad(ds, cfg.scale_layout, cfg.rows, cfg.rpc, x.dtype),
            _table_grad(dh, cfg.shift_layout, cfg.rows, cfg.rpc, x.dtype))


def _gelu_grads(x, bias, gy, cfg: ElementwiseProblem):
    """(dx, dbias) of GELU from its output gradient."""
    dx, db = K.gelu_backward(rows_view(x), _tab(cfg.layout, bias), rows_view(gy), cfg.rpc, cfg.backend)
    return dx.view(x.shape), _table_grad(db, cfg.layout, cfg.rows, cfg.rpc, x.dtype)


def _gated_grads(gate, y, go, cfg: ElementwiseProblem):
    """(dgate, dy) of the gated residual from its output gradient (dx is the output gradient itself)."""
    dy, dg = K.gated_backward(_tab(cfg.layout, gate), rows_view(y), rows_view(go), cfg.rpc, cfg.backend)
    return _table_grad(dg, cfg.layout, cfg.rows, cfg.rpc, y.dtype), dy.view(y.shape)


# ---- row norm (modulated LayerNorm, RMSNorm) ---------------------------------------------------------

def naive_norm(x, scale, shift, cfg: NormProblem):
    if cfg.center:
        xh = naive.layer_norm(x, eps=cfg.eps)
    else:
        xh = naive.rms_norm(x, None, cfg.eps)
    y = xh * (cfg.offset + scale) if scale is not None else (xh if cfg.offset == 1.0 else xh * cfg.offset)
    return y if shift is None else y + shift


def naive_norm_jvp(cfg: NormProblem):
    """(y, ty) of the row norm in NormJVPFunction's argument order (x, tx, scale, shift, tscale, tshift)."""
    both = _naive_jvp(lambda a, s, h: naive_norm(a, s, h, cfg), 3)
    return lambda x, tx, s, h, ts, th: both(x, s, h, tx, ts, th)


class NormFunction(torch.autograd.Function):
    """y = xh * (offset + scale) + shift, xh = LayerNorm (center) or RMSNorm of x over the last dim."""

    @staticmethod
    def forward(x, scale, shift, cfg: NormProblem):
        y, stats = K.norm_forward(rows_view(x), _tab(cfg.scale_layout, scale), _tab(cfg.shift_layout, shift),
                                  cfg.offset, cfg.center, cfg.eps, cfg.backend)
        return _output(y, cfg.x_shape), stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, cfg = inputs
        _keep(ctx, cfg, (x, scale, shift), (x, scale, shift), stats=output[1])

    @staticmethod
    def backward(ctx, gy, _gstats):
        x, scale, shift, stats = ctx.saved_tensors
        cfg = ctx.cfg
        if gy is None:
            return None, None, None, None
        return differentiable_backward(lambda *a: _norm_grads(*a, cfg), lambda a, b, c: naive_norm(a, b, c, cfg),
                                       (x, scale, shift), (gy,), (stats,)) + (None,)

    @staticmethod
    def jvp(ctx, tx, tscale, tshift, _tcfg):
        x, scale, shift = ctx.saved_tensors
        y, ty, _ = NormJVPFunction.apply(x, zeros_if_none(tx, x), scale, shift, zeros_if_none(tscale, scale),
                                         zeros_if_none(tshift, shift), ctx.cfg)
        return ty, None


class NormJVPFunction(torch.autograd.Function):
    """(y, ty) of the row norm along (tx, tscale, tshift); backward through both outputs in one pass."""

    @staticmethod
    def forward(x, tx, scale, shift, tscale, tshift, cfg: NormProblem):
        ss, hs = cfg.scale_layout, cfg.shift_layout
        y, ty, stats = K.norm_jvp_forward(rows_view(x), rows_view(tx), _tab(ss, scale), _tab(hs, shift),
                                          _tab(ss, tscale), _tab(hs, tshift), cfg.offset, cfg.center, cfg.eps,
                                          cfg.backend)
        return _output(y, cfg.x_shape), _output(ty, cfg.x_shape), stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, cfg = inputs
        _keep(ctx, cfg, tensors, tensors, stats=output[2])
        record_tangent_output(ctx, output[1])

    @staticmethod
    def backward(ctx, gy, gt, _gstats):
        gt = gt if ctx.tangent_grad else None
        x, tx, scale, shift, tscale, tshift, stats = ctx.saved_tensors
        cfg = ctx.cfg
        if gy is None and gt is None:
            return (None,) * 7
        ss, hs, R, rpc, dt = cfg.scale_layout, cfg.shift_layout, cfg.rows, cfg.rpc, x.dtype

        def fused(x, tx, scale, shift, tscale, tshift, gy, gt, stats):
            if gt is None:
                dx, ds, dh = _norm_grads(x, scale, shift, gy, stats[:, :2].contiguous(), cfg)
                return dx, None, ds, dh, None, None
            dx, dtx, ds, dh, dts, dth = K.norm_jvp_backward(
                rows_view(x), rows_view(tx), _tab(ss, scale), _tab(ss, tscale), stats, _rows_opt(gy), rows_view(gt),
                cfg.offset, cfg.center, rpc, shift is not None, cfg.backend)
            dh = None if gy is None else _table_grad(dh, hs, R, rpc, dt)  # ty does not depend on the shift
            return (dx.view(x.shape), dtx.view(x.shape), _table_grad(ds, ss, R, rpc, dt), dh,
                    _table_grad(dts, ss, R, rpc, dt), _table_grad(dth, hs, R, rpc, dt))

        operands = redual_saved(ctx, (x, tx, scale, shift, tscale, tshift), ((0, 1), (2, 4), (3, 5)))
        return differentiable_backward(fused, naive_norm_jvp(cfg), operands, (gy, gt), (stats,)) + (None,)

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-over-forward (nested torch.func.jvp): the naive formula's second derivatives."""
        return forward_over_forward(naive_norm_jvp(ctx.cfg), ctx.saved_tensors, tangents[:6],
                                    ctx.tangent_grad) + (None,)


# ---- GELU (tanh) with optional bias ------------------------------------------------------------------

class GeluFunction(torch.autograd.Function):
    """y = gelu_tanh(x + bias)."""

    @staticmethod
    def forward(x, bias, cfg: ElementwiseProblem):
        return _output(K.gelu_forward(rows_view(x), _tab(cfg.layout, bias), cfg.backend), cfg.x_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, cfg = inputs
        _keep(ctx, cfg, (x, bias), (x, bias))

    @staticmethod
    def backward(ctx, gy):
        x, bias = ctx.saved_tensors
        cfg = ctx.cfg
        if gy is None:
            return None, None, None
        return differentiable_backward(lambda *a: _gelu_grads(*a, cfg), naive.gelu_tanh, (x, bias), (gy,)) + (None,)

    @staticmethod
    def jvp(ctx, tx, tbias, _tcfg):
        x, bias = ctx.saved_tensors
        _, ty = GeluJVPFunction.apply(x, zeros_if_none(tx, x), bias, zeros_if_none(tbias, bias), ctx.cfg)
        return ty


def naive_gelu_jvp(x, tx, bias, tbias):
    """(y, ty) of GELU in GeluJVPFunction's argument order."""
    return _naive_jvp(naive.gelu_tanh, 2)(x, bias, tx, tbias)


class GeluJVPFunction(torch.autograd.Function):
    """(y, ty) = gelu_tanh(z), gelu_tanh'(z) (tx + tbias) with z = x + bias; backward through both."""

    @staticmethod
    def forward(x, tx, bias, tbias, cfg: ElementwiseProblem):
        y, ty = K.gelu_jvp_forward(rows_view(x), rows_view(tx), _tab(cfg.layout, bias), _tab(cfg.layout, tbias),
                                   cfg.backend)
        return _output(y, cfg.x_shape), _output(ty, cfg.x_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        *tensors, cfg = inputs
        _keep(ctx, cfg, tensors, tensors)
        record_tangent_output(ctx, output[1])

    @staticmethod
    def backward(ctx, gy, gt):
        gt = gt if ctx.tangent_grad else None
        x, tx, bias, tbias = ctx.saved_tensors
        cfg = ctx.cfg
        if gy is None and gt is None:
            return (None,) * 5
        sp, R, rpc, dt = cfg.layout, cfg.rows, cfg.rpc, x.dtype

        def fused(x, tx, bias, tbias, gy, gt):
            if gt is None:
                dx, db = _gelu_grads(x, bias, gy, cfg)
                return dx, None, db, None
            dx, dtx, db, dtb = K.gelu_jvp_backward(rows_view(x), rows_view(tx), _tab(sp, bias), _tab(sp, tbias),
                                                   _rows_opt(gy), rows_view(gt), rpc, cfg.backend)
            return (dx.view(x.shape), dtx.view(x.shape), _table_grad(db, sp, R, rpc, dt),
                    _table_grad(dtb, sp, R, rpc, dt))

        operands = redual_saved(ctx, (x, tx, bias, tbias), ((0, 1), (2, 3)))
        return differentiable_backward(fused, naive_gelu_jvp, operands, (gy, gt)) + (None,)

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-over-forward (nested torch.func.jvp): the naive formula's second derivatives."""
        return forward_over_forward(naive_gelu_jvp, ctx.saved_tensors, tangents[:4], ctx.tangent_grad)


# ---- gated residual ----------------------------------------------------------------------------------

class GatedFunction(torch.autograd.Function):
    """out = x + gate * y."""

    @staticmethod
    def forward(x, gate, y, cfg: ElementwiseProblem):
        return _output(K.gated_forward(rows_view(x), _tab(cfg.layout, gate), rows_view(y), cfg.backend), cfg.x_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, y, cfg = inputs
        _keep(ctx, cfg, (gate, y), (x, gate, y))

    @staticmethod
    def backward(ctx, go):
        gate, y = ctx.saved_tensors
        cfg = ctx.cfg
        if go is None:
            return None, None, None, None
        dg, dy = differentiable_backward(lambda *a: _gated_grads(*a, cfg), lambda g, y_: g * y_, (gate, y), (go,))
        return go, dg, dy, None

    @staticmethod
    def jvp(ctx, tx, tgate, ty, _tcfg):
        x, gate, y = ctx.saved_tensors
        _, tout = GatedJVPFunction.apply(x, zeros_if_none(tx, x), gate, zeros_if_none(tgate, gate), y,
                                         zeros_if_none(ty, y), ctx.cfg)
        return tout


class GatedJVPFunction(torch.autograd.Function):
    """(out, tout) = (x + gate y, tx + tgate y + gate ty); backward through both outputs."""

    @staticmethod
    def forward(x, tx, gate, tgate, y, ty, cfg: ElementwiseProblem):
        sp = cfg.layout
        out, tout = K.gated_jvp_forward(rows_view(x), rows_view(tx), _tab(sp, gate), _tab(sp, tgate), rows_view(y),
                                        rows_view(ty), cfg.backend)
        return _output(out, cfg.x_shape), _output(tout, cfg.x_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, tx, gate, tgate, y, ty, cfg = inputs
        _keep(ctx, cfg, (gate, tgate, y, ty), (gate, tgate, y, ty))
        record_tangent_output(ctx, output[1])

    @staticmethod
    def backward(ctx, go, gto):
        gto = gto if ctx.tangent_grad else None
        gate, tgate, y, ty = ctx.saved_tensors
        cfg = ctx.cfg
        if go is None and gto is None:
            return (None,) * 7
        sp, R, rpc, dt = cfg.layout, cfg.rows, cfg.rpc, y.dtype

        def fused(gate, tgate, y, ty, go, gto):
            if gto is None:
                dg, dy = _gated_grads(gate, y, go, cfg)
                return dg, None, dy, None
            dy, dty, dg, dtg = K.gated_jvp_backward(_tab(sp, gate), _tab(sp, tgate), rows_view(y), rows_view(ty),
                                                    _rows_opt(go), rows_view(gto), rpc, cfg.backend)
            return (_table_grad(dg, sp, R, rpc, dt), _table_grad(dtg, sp, R, rpc, dt), dy.view(y.shape),
                    dty.view(y.shape))

        def naive_jvp(g, tg, y_, ty_):
            return g * y_, tg * y_ + g * ty_
        operands = redual_saved(ctx, (gate, tgate, y, ty), ((0, 1), (2, 3)))
        dg, dtg, dy, dty = differentiable_backward(fused, naive_jvp, operands, (go, gto))
        return go, gto, dg, dtg, dy, dty, None

    @staticmethod
    def jvp(ctx, dx, dtx, dgate, dtgate, dy, dty, _tcfg):
        """Forward-over-forward: out and tout are bilinear in (gate, y), linear in x and tx."""
        gate, tgate, y, ty = ctx.saved_tensors
        dgate, dtgate, dy, dty = (zeros_if_none(t, p) for t, p in ((dgate, gate), (dtgate, tgate), (dy, y), (dty, ty)))
        dout = dgate * y + gate * dy
        dtout = dtgate * y + tgate * dy + dgate * ty + gate * dty
        dout, dtout = (d if t is None else d + t for d, t in ((dout, dx), (dtout, dtx)))
        return dout, (dtout if ctx.tangent_grad else None)


# ---- linear ------------------------------------------------------------------------------------------

def _lead_rows(x) -> int:
    """Rows of ``x`` (..., K): the product of its leading dims (defined when K == 0, unlike numel // K)."""
    return math.prod(x.shape[:-1])


class LinearFunction(torch.autograd.Function):
    """y = x W^T + b; its JVP runs one product on the stacked [x; tx]."""

    @staticmethod
    def forward(x, weight, bias, backend: str):
        y = F.linear(x, weight, bias)  # a view of the 2-D product when x has more than two dims
        return _output(y, y.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight, bias)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        if gy is None:
            return None, None, None, None
        R = _lead_rows(x)  # not numel // K, nor reshape(-1, .): in_features or out_features may be 0
        g2, x2 = gy.reshape(R, gy.shape[-1]), x.reshape(R, x.shape[-1])
        dx = (gy @ weight) if ctx.needs_input_grad[0] else None
        dw = (g2.t() @ x2) if ctx.needs_input_grad[1] else None
        db = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None

    @staticmethod
    def jvp(ctx, tx, tweight, tbias, _tb):
        """Fallback (``linear`` unpacks dual inputs itself and stacks): the tangent alone, no zero products."""
        x, weight, bias = ctx.saved_tensors
        out_shape = x.shape[:-1] + (weight.shape[0],)
        ty = None
        if tx is not None:
            ty = F.linear(tx, weight)
        if tweight is not None:
            ty = F.linear(x, tweight) if ty is None else ty + F.linear(x, tweight)
        if tbias is not None:
            ty = tbias.expand(out_shape) if ty is None else ty + tbias
        return torch.zeros(out_shape, dtype=x.dtype, device=x.device) if ty is None else ty


def naive_linear_jvp(x, tx, weight, bias, tweight, tbias):
    y = F.linear(x, weight, bias)
    ty = F.linear(tx, weight)
    if tweight is not None:
        ty = ty + F.linear(x, tweight)
    if tbias is not None:
        ty = ty + tbias
    return y, ty


class LinearJVPFunction(torch.autograd.Function):
    """(y, ty) = (x W^T + b, [x; tx] stacked through W, + x tW^T when tW is given, + tb)."""

    @staticmethod
    def forward(x, tx, weight, bias, tweight, tbias):
        R, N = _lead_rows(x), weight.shape[0]
        out = K.linear_jvp_forward(x.reshape(R, x.shape[-1]), tx.reshape(R, x.shape[-1]), weight, bias, tweight, tbias)
        shape = x.shape[:-1] + (N,)
        return _output(out[:R], shape), _output(out[R:], shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, tx, weight, bias, tweight, tbias = inputs
        ctx.save_for_backward(x, tx, weight, bias, tweight, tbias)
        ctx.save_for_forward(x, tx, weight, bias, tweight, tbias)
        record_tangent_output(ctx, output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy, gt):
        gt = gt if ctx.tangent_grad else None
        x, tx, weight, bias, tweight, tbias = ctx.saved_tensors
        if gy is None and gt is None:
            return (None,) * 6
        need_tw = tweight is not None and ctx.needs_input_grad[4]

        def fused(x, tx, weight, bias, tweight, tbias, gy, gt):
            K_, N = x.shape[-1], weight.shape[0]
            R = _lead_rows(x)
            x2 = x.reshape(R, K_)
            if gt is None:
                g2 = gy.reshape(R, N)
                return ((gy @ weight), None, g2.t() @ x2, g2.sum(0) if bias is not None else None, None, None)
            gt2 = gt.reshape(R, N)
            gy2 = torch.zeros_like(gt2) if gy is None else gy.reshape(R, N)
            dxs, dw, dtw = K.linear_jvp_backward(x2, tx.reshape(R, K_), weight, tweight, gy2, gt2, need_tw)
            db = gy2.sum(0) if bias is not None and gy is not None else None  # ty does not depend on the bias
            return (dxs[:R].view(x.shape), dxs[R:].view(x.shape), dw, db, dtw if need_tw else None,
                    gt2.sum(0) if tbias is not None else None)
        operands = redual_saved(ctx, (x, tx, weight, bias, tweight, tbias), ((0, 1), (2, 4), (3, 5)))
        return differentiable_backward(fused, naive_linear_jvp, operands, (gy, gt))

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward-over-forward (nested torch.func.jvp): the naive formula's JVP (bilinear in x and W)."""
        dy, dty = forward_over_forward(naive_linear_jvp, ctx.saved_tensors, tangents, True)
        return dy, (dty if ctx.tangent_grad else None)


# ---- torch.func.vmap: one call per example ---------------------------------------------------------------
# (the Functions' problem descriptors describe one example's shapes, which is what they see under vmap)

for _fn in (NormFunction, NormJVPFunction, GeluFunction, GeluJVPFunction, GatedFunction, GatedJVPFunction,
            LinearFunction, LinearJVPFunction):
    _fn.vmap = vmap_by_example(_fn)
del _fn


# ---- torch.compile: the Functions without their jvp rule (``_autodiff.without_jvp``) ----------------------

NormCompiledFunction = without_jvp(NormFunction)
GeluCompiledFunction = without_jvp(GeluFunction)
GatedCompiledFunction = without_jvp(GatedFunction)
LinearCompiledFunction = without_jvp(LinearFunction)
NormJVPCompiledFunction = without_jvp(NormJVPFunction)
GeluJVPCompiledFunction = without_jvp(GeluJVPFunction)
GatedJVPCompiledFunction = without_jvp(GatedJVPFunction)
LinearJVPCompiledFunction = without_jvp(LinearJVPFunction)
for _fn in (NormJVPCompiledFunction, GeluJVPCompiledFunction, GatedJVPCompiledFunction, LinearJVPCompiledFunction):
    _fn.vmap = vmap_by_example(_fn)
del _fn
