"""Argument checking for attention: one function turns SDPA-style arguments into an AttentionProblem.

Every public entry point calls :func:`make_problem`; bad input is a ``ValueError`` (``TypeError`` for a
non-tensor) that names the argument and says what was expected.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
import torch.autograd.forward_ad as fwAD

from .._autodiff import concrete_int

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """Sizes and options of one attention call, in the (batch, heads, tokens, head_dim) layout.

    ``mask`` is the user's mask unchanged (never expanded in memory); ``mask_kind`` is ``"bool"``
    (True = may attend), ``"float"`` (added to the logits; float32 or the query dtype, as in SDPA) or ``None``.
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int
    scale: float
    is_causal: bool
    mask: Optional[torch.Tensor]
    mask_kind: Optional[str]
    dtype: torch.dtype
    device: torch.device
    #: dtype of the tangent output tO of the forward+JVP pass: ``dtype``, or float32 for 16-bit inputs
    tangent_dtype: Optional[torch.dtype] = None
    #: whether a backward pass also returns the gradient of the float mask (set by the autograd.Functions when
    #: the mask needs one; the mask pass is the same for every backend)
    mask_grad: bool = False

    @property
    def tangent_fp32(self) -> bool:
        """Whether tO is returned in float32 although the inputs are 16-bit (not rounded to their dtype)."""
        return self.tangent_dtype == torch.float32 and self.dtype != torch.float32

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 when there are no heads)."""
        return self.q_heads // self.kv_heads if self.kv_heads else 1

    def as_dict(self) -> dict:
        """Keyword form handed to backends' ``supports`` predicates: what the backend choice may depend on.
        Sequence lengths are left out: the choice never depends on them, and under torch.compile with dynamic
        shapes they are symbolic (the choice is made once, at trace time, for every length)."""
        return dict(dtype=self.dtype, device=self.device, head_dim=concrete_int(self.head_dim),
                    v_head_dim=concrete_int(self.v_head_dim), mask_kind=self.mask_kind)


def _tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected 4 dims (batch, heads, tokens, head_dim) (fk.attention itself also takes SDPA's "
            f"layouts of 2 or more dims, (..., tokens, head_dim)), got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


class SDPAShapes:
    """scaled_dot_product_attention's shapes (N, ..., heads, tokens, head_dim) in the 4-d layout.

    As in SDPA, the dims before (heads, tokens, head_dim) broadcast: inputs with fewer dims are read with
    leading ones (a 3-d key serves a 4-d query's every batch entry), and leading dims of 1 stretch. 2-d inputs
    (tokens, head_dim) are one head of a batch of one, 3-d inputs (heads, tokens, head_dim) a batch of one; the
    leading dims of inputs with more than 4 dims are flattened into the batch (views where the strides allow;
    an input broadcast over some but not all of them is copied). The mask broadcasts as in SDPA: one with at
    most 3 dims (2 with 2-d inputs) is kept (it broadcasts over the flattened batch), a longer one is
    broadcast to the leading dims and flattened with them. :meth:`restore` gives an output the leading dims
    back. 4-d inputs (and anything :func:`make_problem` must reject) pass through unchanged: their batch
    broadcasts in :func:`broadcast_batch`, without copies."""

    def __init__(self, query, key, value):
        xs = (query, key, value)
        self.lead = None
        self.single_head = False
        if not all(isinstance(x, torch.Tensor) for x in xs) or all(x.dim() == 4 for x in xs):
            return
        for name, x in zip(("query", "key", "value"), xs):
            if x.dim() < 2:
                if name == "query":
                    return  # make_problem names the bad shape
                raise ValueError(f"{name}: expected at least 2 dims (..., tokens, head_dim), got shape "
                                 f"{tuple(x.shape)}")
        self.ndim = max(x.dim() for x in xs)
        self.single_head = self.ndim == 2
        leads = [(1,) * (self.ndim - x.dim()) + tuple(x.shape[:-2]) for x in xs]
        names = ("query", "key", "value")
        for i, j in ((0, 1), (0, 2), (1, 2)):  # the first pair that does not broadcast names the input
            try:
                torch.broadcast_shapes(leads[i][:-1], leads[j][:-1])
            except RuntimeError:
                raise ValueError(f"{names[j]}: leading dims {leads[j][:-1]} do not broadcast with {names[i]}'s "
                                 f"{leads[i][:-1]} (SDPA's (N, ..., heads, tokens, head_dim))") from None
        self.lead = tuple(torch.broadcast_shapes(*(lead[:-1] for lead in leads)))
        self._heads = [lead[-1] if self.ndim > 2 else 1 for lead in leads]

    @property
    def reshaped(self) -> bool:
        """Whether the inputs are not already 4-d."""
        return self.lead is not None

    def _four_d(self, x, heads):
        """One input (heads as given) as (batch, heads, tokens, channels): the leading dims flattened, a
        leading-dims-all-one input kept a batch of one (broadcast_batch stretches it without a copy)."""
        if x is None:
            return None
        lead = (1,) * (len(self.lead) - len(x.shape[:-3])) + tuple(x.shape[:-3])
        if all(n == 1 for n in lead):
            return x.reshape(1, heads, *x.shape[-2:])
        if lead != self.lead:
            x = x.reshape(*lead, heads, *x.shape[-2:]).expand(*self.lead, heads, *x.shape[-2:])
        return x.reshape(math.prod(self.lead), heads, *x.shape[-2:])

    def inputs(self, *xs):
        """q, k, v or their tangents (in that order; None stays None) in the 4-d layout."""
        return tuple(self._four_d(x, h) for x, h in zip(xs, self._heads))

    def tangents(self, primals, tangents):
        """Tangents (None = zero) in the 4-d layout, each first checked to have its primal's shape."""
        check_tangent_shapes(primals, tangents)
        return self.inputs(*tangents)

    def mask(self, attn_mask):
        """The mask for the 4-d inputs."""
        if self.single_head and isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 2:
            raise ValueError(f"attn_mask: expected at most 2 dims (tokens, keys) with 2-d query, key and value, got "
                             f"shape {tuple(attn_mask.shape)}")
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() <= 3:
            return attn_mask
        if attn_mask.dim() > len(self.lead) + 3:
            raise ValueError(f"attn_mask: expected at most {len(self.lead) + 3} dims like query, got shape "
                             f"{tuple(attn_mask.shape)}")
        if not _broadcastable(tuple(attn_mask.shape[:-3]), self.lead):
            raise ValueError(f"attn_mask: leading dims {tuple(attn_mask.shape[:-3])} do not broadcast to the "
                             f"inputs' {self.lead}")
        return attn_mask.expand(*self.lead, *attn_mask.shape[-3:]).reshape(math.prod(self.lead), *attn_mask.shape[-3:])

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """A (batch, heads, tokens, channels) output with the inputs' leading dims."""
        if self.single_head:
            return out.reshape(out.shape[-2:])
        if self.ndim == 3:
            return out.reshape(out.shape[-3:])
        return out.reshape(*self.lead, *out.shape[-3:])


def _broadcastable(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target``."""
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def _broadcast_size(sizes):
    """The size these sizes broadcast to (None where they do not)."""
    try:
        return torch.broadcast_shapes(*((n,) for n in sizes))[0]
    except RuntimeError:
        return None


def broadcast_batch(primals, tangents=(None, None, None), enable_gqa: bool = False):
    """4-d q, k, v (and their tangents, None = zero) with the batch dim broadcast as SDPA broadcasts it (a key /
    value batch of 1 serves every query batch, and the reverse), and, without ``enable_gqa``, the heads dim too
    (one query head against several key / value heads, or one of key / value with one head): expanded views,
    never copies. One key / value head for several query heads stays as it is (the kernels read it once per
    query head). Anything else comes back unchanged (make_problem names the mismatch); a tangent must have its
    primal's shape."""
    if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in primals):
        return primals, tangents
    heads = [x.shape[1] for x in primals]
    batch = _broadcast_size(x.shape[0] for x in primals)
    if batch is None:
        return primals, tangents
    head = None if enable_gqa else _broadcast_size(heads)
    if head is None:
        target = [(batch, h) for h in heads]
    else:
        kv_heads = heads[1] if heads[1] == heads[2] else head
        target = [(batch, head), (batch, kv_heads), (batch, kv_heads)]
    if all(tuple(x.shape[:2]) == t for x, t in zip(primals, target)):
        return primals, tangents
    check_tangent_shapes(primals, tangents)

    def expand(x, t):
        return x if x is None or tuple(x.shape[:2]) == t else x.expand(*t, *x.shape[2:])

    return (tuple(expand(x, t) for x, t in zip(primals, target)),
            tuple(expand(x, t) for x, t in zip(tangents, target)))


def check_tangent_shapes(primals, tangents) -> None:
    """Each tangent (None = zero) has its primal's shape (ValueError naming the input otherwise): checked before
    the inputs are reshaped or broadcast, which would hide a mismatch."""
    for name, x, t in zip(("query", "key", "value"), primals, tangents):
        if isinstance(t, torch.Tensor) and t.shape != x.shape:
            raise ValueError(f"tangent of {name}: expected shape {tuple(x.shape)}, got {tuple(t.shape)}")


def mask_kind(attn_mask: torch.Tensor, q: torch.Tensor) -> str:
    """``"bool"`` or ``"float"`` for a mask of dtype bool, float32 or the query's (what SDPA accepts); ValueError
    naming attn_mask otherwise."""
    if attn_mask.dtype == torch.bool:
        return "bool"
    if attn_mask.dtype in (q.dtype, torch.float32):
        return "float"
    raise ValueError(f"attn_mask: expected dtype bool, float32 or the query dtype {q.dtype} (as SDPA), got "
                     f"{attn_mask.dtype}")


def check_tangent_dtypes(primals, tangents) -> None:
    """Each tangent (None = zero) has its primal's dtype: torch.func.jvp and forward_ad accept a float64 tangent
    for a float32 primal, which the kernels would silently mix. ValueError naming the input otherwise."""
    for name, x, t in zip(("query", "key", "value"), primals, tangents):
        if isinstance(t, torch.Tensor) and t.dtype != x.dtype:
            raise ValueError(f"tangent of {name}: expected dtype {x.dtype} (the dtype of {name}), got {t.dtype}")


def check_like_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Key and value have the query's dtype and device (ValueError naming the input otherwise)."""
    for name, x in (("key", k), ("value", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {x.dtype} does not match query dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: device {x.device} does not match query device {q.device}")


def check_tangents(primals, tangents) -> None:
    """Each tangent is None (zero) or a tensor of its primal's shape, dtype and device (TypeError /
    ValueError naming it otherwise)."""
    for name, t, ref in zip(("tangent of query", "tangent of key", "tangent of value"), tangents, primals):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
            raise ValueError(
                f"{name}: expected shape {tuple(ref.shape)}, {ref.dtype} on {ref.device}; "
                f"got {tuple(t.shape)}, {t.dtype} on {t.device}"
            )


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) for None, else a finite real number (TypeError / ValueError); a
    0-d real tensor is read as its value, as SDPA reads it, unless it requires grad (the scale is a constant
    here, and SDPA would drop that gradient silently)."""
    if scale is None:  # (a constant also under dynamic shapes: the graph is specialised to the head dim)
        head_dim = concrete_int(head_dim)
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"scale: expected None, a real number or a 0-d real tensor, got a tensor of shape "
                            f"{tuple(scale.shape)} and dtype {scale.dtype}")
        if scale.requires_grad:
            raise TypeError("scale: a tensor that requires grad; the softmax scale is a constant here (its "
                            "gradient would be lost): pass float(scale) or a detached tensor")
        if not torch.compiler.is_compiling() and fwAD.unpack_dual(scale).tangent is not None:
            raise TypeError("scale: a tensor with a forward-mode tangent; the softmax scale is a constant here (its "
                            "tangent would be lost): pass float(scale), or fold a varying scale into query")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale: expected None or a real number, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return scale


def check_tangent_dtype(tangent_dtype, dtype: torch.dtype) -> Optional[torch.dtype]:
    """``tangent_dtype`` of attention_jvp: None (the inputs' dtype), the inputs' dtype, or float32 for 16-bit
    inputs; ValueError otherwise."""
    if tangent_dtype is None or tangent_dtype == dtype:
        return None
    if tangent_dtype == torch.float32 and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"tangent_dtype: expected None, {dtype} (the inputs' dtype) or torch.float32, got "
                         f"{tangent_dtype}")
    raise ValueError(f"tangent_dtype: expected None or {dtype} (the inputs' dtype; a float32 tO is for float16/"
                     f"bfloat16 inputs), got {tangent_dtype}")


def make_problem(
    q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
    enable_gqa: bool = False, tangents: tuple = (), tangent_dtype: Optional[torch.dtype] = None,
) -> AttentionProblem:
    """Check SDPA arguments (and optional tangents ``(tq, tk, tv)`` and the tangent output dtype) and
    describe the call."""
    q, k, v = _tensor("query", q), _tensor("key", k), _tensor("value", v)
    check_like_query(q, k, v)
    B, Hq, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"key/value: batch size must match query's {B}, got {k.shape[0]} and {v.shape[0]}")
    if k.shape[-1] != D:
        raise ValueError(f"key: head_dim {k.shape[-1]} does not match query head_dim {D}")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(
            f"value: heads and tokens {tuple(v.shape[1:3])} must match key's {tuple(k.shape[1:3])}"
        )
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):
        raise ValueError(f"query: heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Hq != Hkv and Hkv != 1 and not enable_gqa:  # one key/value head broadcasts over the query's (as in SDPA)
        raise ValueError(
            f"key: {Hkv} heads differ from query's {Hq}; pass enable_gqa=True for grouped-query attention"
        )
    check_tangent_dtypes((q, k, v), tangents)
    check_tangents((q, k, v), tangents)
    if isinstance(dropout_p, torch.Tensor) and dropout_p.dim() == 0 and dropout_p.dtype.is_floating_point:
        dropout_p = dropout_p.item()  # (as SDPA reads it)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or dropout_p != 0.0:
        raise ValueError(f"dropout_p: only 0.0 is supported (attention dropout is not implemented), got {dropout_p}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool (as scaled_dot_product_attention), got {type(is_causal).__name__}"
                        f" {is_causal!r}")
    scale = check_scale(scale, D)
    kind = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if is_causal:
            raise ValueError("attn_mask: cannot be combined with is_causal=True (as in SDPA); "
                             "fold causality into the mask")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask: device {attn_mask.device} does not match query device {q.device}")
        kind = mask_kind(attn_mask, q)
        if attn_mask.dim() > 4:
            raise ValueError(f"attn_mask: expected at most 4 dims, got shape {tuple(attn_mask.shape)}")
        try:
            full = torch.broadcast_shapes(attn_mask.shape, (B, Hq, Lq, Lk))
        except RuntimeError:
            full = None
        if full != (B, Hq, Lq, Lk):
            raise ValueError(
                f"attn_mask: shape {tuple(attn_mask.shape)} is not broadcastable to (batch, heads, q_len, kv_len)"
                f" = {(B, Hq, Lq, Lk)}"
            )
    return AttentionProblem(
        batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Lq, kv_len=Lk, head_dim=D, v_head_dim=Dv, scale=scale,
        is_causal=is_causal, mask=attn_mask, mask_kind=kind, dtype=q.dtype, device=q.device,
        tangent_dtype=check_tangent_dtype(tangent_dtype, q.dtype),
    )
