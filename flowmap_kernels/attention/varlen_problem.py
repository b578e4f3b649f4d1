"""Argument checking for variable-length (packed) attention: one function turns the arguments of
``attention_varlen`` into a :class:`VarlenProblem`.

Layout (the flash-attn varlen convention): q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and key rows cu_seqlens_k[i]:cu_seqlens_k[i+1].
Bad input is a ``ValueError`` (``TypeError`` for a wrong type) naming the argument and what was expected.
Checking the offsets reads them on the host (one device synchronisation per call on CUDA). While torch.compile
traces, the offsets are data it cannot read: their shapes are checked at trace time and their values by a
device-side assertion in the graph (:func:`assert_offsets`); ``max_seqlen_q`` / ``max_seqlen_k`` default to the
packed totals there (an upper bound; pass the true maxima for the Triton kernels' smallest grid).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .._autodiff import concrete_int
from .problem import SUPPORTED_DTYPES, check_like_query, check_scale, check_tangents

OFFSET_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class VarlenProblem:
    """Sizes and options of one packed attention call.

    ``q_offsets`` / ``k_offsets`` are the cumulative offsets as Python ints (length batch + 1), None while
    torch.compile traces (not read); ``max_q`` / ``max_k`` the longest query / key sequence (at least the actual
    maxima).
    """

    batch: int
    q_heads: int
    kv_heads: int
    total_q: int
    total_k: int
    max_q: int
    max_k: int
    head_dim: int
    v_head_dim: int
    scale: float
    is_causal: bool
    q_offsets: Optional[tuple]
    k_offsets: Optional[tuple]
    dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def segments(self):
        """(q_start, q_end, k_start, k_end) of each sequence, in order."""
        qo, ko = self.q_offsets, self.k_offsets
        if qo is None or ko is None:
            raise RuntimeError("attention_varlen: the per-sequence (naive) path needs the offsets on the host, "
                               "which torch.compile does not read; inside compiled code the masked dense form "
                               "(varlen_naive.masked_attention) serves it")
        return [(qo[i], qo[i + 1], ko[i], ko[i + 1]) for i in range(self.batch)]

    def as_dict(self) -> dict:
        """Keyword form handed to backends' ``supports`` predicates (as :meth:`AttentionProblem.as_dict`)."""
        return dict(dtype=self.dtype, device=self.device, head_dim=concrete_int(self.head_dim),
                    v_head_dim=concrete_int(self.v_head_dim), mask_kind=None)


def _packed(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected 3 dims (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _offsets(name: str, cu, total: int, device: torch.device, read: bool = True) -> Optional[list]:
    """The offsets checked (type, dtype, shape, device; then, when ``read``, their values on the host)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of cumulative offsets, got {type(cu).__name__}")
    if cu.dtype not in OFFSET_DTYPES:
        raise ValueError(f"{name}: expected dtype torch.int32 (or torch.int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: device {cu.device} does not match query device {device}")
    if cu.requires_grad:
        raise ValueError(f"{name}: must not require grad")
    if not read:
        return None
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {offsets[0]}")
    for i in range(len(offsets) - 1):
        if offsets[i + 1] < offsets[i]:
            raise ValueError(f"{name}: must be non-decreasing, got {offsets[i]} then {offsets[i + 1]} "
                             f"at positions {i}, {i + 1}")
    if offsets[-1] != total:
        raise ValueError(f"{name}: last offset {offsets[-1]} must equal the number of packed tokens {total}")
    return offsets


def _max_len(name: str, given, actual: Optional[int], total: int) -> int:
    """The longest sequence: ``given`` (at least ``actual``), or ``actual``; ``actual`` None while torch.compile
    traces (then ``given`` is checked by :func:`assert_offsets` and None stands for ``total``)."""
    if given is None:
        return total if actual is None else actual
    if isinstance(given, bool) or not isinstance(given, (numbers.Integral, torch.SymInt)):  # (numpy ints too)
        raise TypeError(f"{name}: expected an int or None, got {type(given).__name__}")
    if actual is None:
        return given
    given = int(given)
    if given < actual:
        raise ValueError(f"{name}: {given} is less than the longest sequence ({actual} tokens)")
    return given


def make_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                        is_causal: bool = False, scale=None, enable_gqa: bool = False,
                        tangents: tuple = ()) -> VarlenProblem:
    """Check packed attention arguments (and optional tangents ``(tq, tk, tv)``) and describe the call."""
    q, k, v = _packed("query", q), _packed("key", k), _packed("value", v)
    check_like_query(q, k, v)
    total_q, Hq, D = q.shape
    total_k, Hkv, Dv = v.shape
    if k.shape[2] != D:
        raise ValueError(f"key: head_dim {k.shape[2]} does not match query head_dim {D}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"value: tokens and heads {tuple(v.shape[:2])} must match key's {tuple(k.shape[:2])}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query: heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"key: {Hkv} heads differ from query's {Hq}; pass enable_gqa=True for grouped-query "
                         f"attention")
    check_tangents((q, k, v), tangents)
    read = not torch.compiler.is_compiling()
    qo = _offsets("cu_seqlens_q", cu_seqlens_q, total_q, q.device, read)
    ko = _offsets("cu_seqlens_k", cu_seqlens_k, total_k, q.device, read)
    nq, nk = cu_seqlens_q.shape[0], cu_seqlens_k.shape[0]
    if nk != nq:
        raise ValueError(f"cu_seqlens_k: length {nk} ({nk - 1} sequences) does not match "
                         f"cu_seqlens_q's {nq} ({nq - 1} sequences)")
    if max(total_q, total_k) > torch.iinfo(torch.int32).max:
        raise ValueError(f"cu_seqlens_q: packed lengths {total_q}, {total_k} exceed the int32 range")
    batch = nq - 1
    max_q = _max_len("max_seqlen_q", max_seqlen_q, None if qo is None else max([0, *lengths(qo)]), total_q)
    max_k = _max_len("max_seqlen_k", max_seqlen_k, None if ko is None else max([0, *lengths(ko)]), total_k)
    if not read:
        assert_offsets("cu_seqlens_q", cu_seqlens_q, total_q, max_q, "max_seqlen_q")
        assert_offsets("cu_seqlens_k", cu_seqlens_k, total_k, max_k, "max_seqlen_k")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__} {is_causal!r}")
    return VarlenProblem(
        batch=batch, q_heads=Hq, kv_heads=Hkv, total_q=total_q, total_k=total_k, max_q=max_q, max_k=max_k,
        head_dim=D, v_head_dim=Dv, scale=check_scale(scale, D), is_causal=is_causal,
        q_offsets=None if qo is None else tuple(qo), k_offsets=None if ko is None else tuple(ko), dtype=q.dtype,
        device=q.device,
    )


def assert_offsets(name: str, cu: torch.Tensor, total: int, max_len: int, max_name: str) -> None:
    """The value checks of the host path as one device-side assertion (for compiled graphs, which cannot read
    the offsets while tracing): a RuntimeError when the graph runs (on CUDA a device assertion)."""
    lengths_ = cu[1:] - cu[:-1]
    ok = (cu[0] == 0) & (cu[-1] == total)
    if lengths_.shape[0] > 0:
        ok = ok & (lengths_ >= 0).all() & (lengths_.max() <= max_len)
    torch._assert_async(ok, f"{name}: offsets must start at 0, be non-decreasing and end at the number of packed "
                            f"tokens, and no sequence may be longer than {max_name}")


def offsets_int32(cu: torch.Tensor) -> torch.Tensor:
    """The offsets as a contiguous int32 tensor (the kernels' dtype); int64 input is converted."""
    return cu.to(torch.int32).contiguous()


def lengths(offsets) -> list:
    """Sequence lengths from cumulative offsets."""
    return [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]


__all__ = ["VarlenProblem", "make_varlen_problem", "offsets_int32", "lengths"]
