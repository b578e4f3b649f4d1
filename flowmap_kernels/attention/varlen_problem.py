"""Argument checking for variable-length (packed) attention: one function turns the arguments of
``attention_varlen`` into a :class:`VarlenProblem`.

Layout (the flash-attn varlen convention): q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1] and key rows cu_seqlens_k[i]:cu_seqlens_k[i+1].
Bad input is a ``ValueError`` (``TypeError`` for a wrong type) naming the argument and what was expected.
Checking the offsets reads them on the host (one device synchronisation per call on CUDA).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
import torch

from .problem import SUPPORTED_DTYPES, check_like_query, check_scale, check_tangents

OFFSET_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class VarlenProblem:
    """Sizes and options of one packed attention call.

    ``q_offsets`` / ``k_offsets`` are the cumulative offsets as Python ints (length batch + 1);
    ``max_q`` / ``max_k`` the longest query / key sequence (at least the actual maxima).
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
    q_offsets: tuple
    k_offsets: tuple
    dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def segments(self):
        """(q_start, q_end, k_start, k_end) of each sequence, in order."""
        qo, ko = self.q_offsets, self.k_offsets
        return [(qo[i], qo[i + 1], ko[i], ko[i + 1]) for i in range(self.batch)]

    def as_dict(self) -> dict:
        """Keyword form handed to backends' ``supports`` predicates."""
        return dict(dtype=self.dtype, device=self.device, head_dim=self.head_dim, v_head_dim=self.v_head_dim,
                    q_len=self.max_q, kv_len=self.max_k, mask_kind=None)


def _packed(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected 3 dims (total_tokens, heads, head_dim), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def _offsets(name: str, cu, total: int, device: torch.device) -> list:
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


def _max_len(name: str, given, actual: int) -> int:
    if given is None:
        return actual
    if isinstance(given, bool) or not isinstance(given, numbers.Integral):  # (numpy integers are ints too)
        raise TypeError(f"{name}: expected an int or None, got {type(given).__name__}")
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
    qo = _offsets("cu_seqlens_q", cu_seqlens_q, total_q, q.device)
    ko = _offsets("cu_seqlens_k", cu_seqlens_k, total_k, q.device)
    if len(ko) != len(qo):
        raise ValueError(f"cu_seqlens_k: length {len(ko)} ({len(ko) - 1} sequences) does not match "
                         f"cu_seqlens_q's {len(qo)} ({len(qo) - 1} sequences)")
    if max(qo[-1], ko[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError(f"cu_seqlens_q: packed lengths {qo[-1]}, {ko[-1]} exceed the int32 range")
    batch = len(qo) - 1
    max_q = _max_len("max_seqlen_q", max_seqlen_q, max([0, *lengths(qo)]))
    max_k = _max_len("max_seqlen_k", max_seqlen_k, max([0, *lengths(ko)]))
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__} {is_causal!r}")
    return VarlenProblem(
        batch=batch, q_heads=Hq, kv_heads=Hkv, total_q=total_q, total_k=total_k, max_q=max_q, max_k=max_k,
        head_dim=D, v_head_dim=Dv, scale=check_scale(scale, D), is_causal=is_causal,
        q_offsets=tuple(qo), k_offsets=tuple(ko), dtype=q.dtype, device=q.device,
    )


def offsets_int32(cu: torch.Tensor) -> torch.Tensor:
    """The offsets as a contiguous int32 tensor (the kernels' dtype); int64 input is converted."""
    return cu.to(torch.int32).contiguous()


def lengths(offsets) -> list:
    """Sequence lengths from cumulative offsets."""
    return [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]


__all__ = ["VarlenProblem", "make_varlen_problem", "offsets_int32", "lengths"]
