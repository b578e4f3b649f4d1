"""Public context-parallel attention: ``context_parallel_attention`` and ``context_parallel_attention_jvp``."""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from .._autodiff import follows_autocast, make_dual, unpack_duals, zeros_if_none
from ..attention import ATTENTION, make_problem
from ..attention.problem import mask_kind
from .comm import all_gather_lengths, layout_from_lengths, world_and_rank
from .ring import RingAttentionFunction, RingAttentionJVPFunction, RingSpec
from .ulysses import ulysses_attention

MODES = ("ring", "ulysses")


def _normalise_mask(attn_mask, q, is_causal, lq_local: int, lk_total: int):
    """The mask as a 4-d (Bm, Hm, Lq_local or 1, Lk or 1) tensor, checked."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError("attn_mask: cannot be combined with is_causal=True (as in SDPA); fold causality into the mask")
    if fwAD.unpack_dual(attn_mask).tangent is not None:
        raise ValueError("attn_mask: forward-mode tangents of the mask are not supported (the mask must be a constant)")
    mask_kind(attn_mask, q)  # ValueError unless bool, float32 or the query dtype
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask: device {attn_mask.device} does not match query device {q.device}")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask: expected at most 4 dims, got shape {tuple(attn_mask.shape)}")
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    want = (q.shape[0], q.shape[1], lq_local, lk_total)
    if any(s not in (1, w) for s, w in zip(m.shape, want)):
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} must broadcast to (batch, heads, local query "
                         f"rows, all keys) = {want}: this rank's query rows against the keys of every rank, in "
                         f"global key order")
    return m


def _ring_backend(q, k, v, scale, enable_gqa, mask, is_causal) -> str:
    p = make_problem(q, k, v, None, 0.0, False, scale, enable_gqa)
    kind = "bool" if is_causal else (None if mask is None else ("bool" if mask.dtype == torch.bool else "float"))
    name = ATTENTION.resolve(None, **dict(p.as_dict(), mask_kind=kind)).backend
    return "torch" if name == "naive" else name  # the ring needs the fused kernels' (O, lse, mu) partials


def _prepare(q, k, v, tangents, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance):
    """Check the arguments and exchange the shard lengths: (problem, world, rank, q layout, k layout, mask)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    p = make_problem(q, k, v, None, 0.0, False, scale, enable_gqa, tangents=tangents)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    world, rank = world_and_rank(group)
    lengths = all_gather_lengths([q.shape[2], k.shape[2]], group, world)
    q_layout = layout_from_lengths("query", [row[0] for row in lengths], world, bool(load_balance))
    k_layout = layout_from_lengths("key", [row[1] for row in lengths], world, bool(load_balance))
    mask = _normalise_mask(attn_mask, q, is_causal, q.shape[2], k_layout.total)
    if mode == "ulysses":
        for name, h in (("query", p.q_heads), ("key", p.kv_heads)):
            if h % world:
                raise ValueError(f"{name}: mode='ulysses' splits heads over the {world} ranks of the group; "
                                 f"{h} heads are not divisible by {world} (use mode='ring')")
    return p, world, rank, q_layout, k_layout, mask


def ring_spec(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, group=None,
              load_balance=False) -> tuple[RingSpec, "torch.Tensor | None"]:
    """The (RingSpec, normalised mask) that ``context_parallel_attention`` hands to the ring Functions."""
    p, world, rank, q_layout, k_layout, mask = _prepare(q, k, v, (), attn_mask, is_causal, scale, enable_gqa,
                                                        group, "ring", load_balance)
    return _ring_spec(p, world, rank, q_layout, k_layout, mask, q, k, v, group, is_causal, enable_gqa), mask


def _ring_spec(p, world, rank, q_layout, k_layout, mask, q, k, v, group, is_causal, enable_gqa) -> RingSpec:
    return RingSpec(group, world, rank, q_layout, k_layout, is_causal, p.scale,
                    _ring_backend(q, k, v, p.scale, enable_gqa, mask, is_causal),
                    mask_rows=mask is not None and mask.shape[2] != 1,
                    mask_cols=mask is not None and mask.shape[3] != 1)


def _run(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance):
    """O (tangents None) or (O, tO) through the autograd-tracked mode implementation."""
    tangents = () if tq is None else (tq, tk, tv)
    p, world, rank, q_layout, k_layout, mask = _prepare(q, k, v, tangents, attn_mask, is_causal, scale, enable_gqa,
                                                        group, mode, load_balance)
    if mode == "ulysses":
        return ulysses_attention(q, k, v, tq, tk, tv, mask, is_causal, p.scale, enable_gqa, group, q_layout,
                                 k_layout)
    spec = _ring_spec(p, world, rank, q_layout, k_layout, mask, q, k, v, group, is_causal, enable_gqa)
    if tq is None:
        o, _ = RingAttentionFunction.apply(q, k, v, mask, spec)
        return o
    o, to, _, _ = RingAttentionJVPFunction.apply(q, k, v, tq, tk, tv, mask, spec)
    return o, to


@follows_autocast("q", "k", "v", "attn_mask")
def context_parallel_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                               group=None, mode: str = "ring", load_balance: bool = False) -> torch.Tensor:
    """Attention over a sequence sharded along tokens across the ranks of ``group``.

    q (B, Hq, Lq_local, D), k (B, Hkv, Lk_local, D), v (B, Hkv, Lk_local, Dv): this rank's shards as made by
    ``shard_sequence(x, group, dim=2, load_balance=load_balance)`` (queries and keys sharded separately, so
    Lq != Lk works) -> O (B, Hq, Lq_local, Dv), this rank's rows of SDPA over the full sequence. ``attn_mask``
    holds this rank's query rows against all keys in global order, broadcastable to (B, Hq, Lq_local, Lk);
    bool (True = may attend) or float (added to the logits). A float mask may require grad (a learned bias):
    this rank's rows get their gradient; one broadcast over the rows gets this rank's share, the shares
    summing over the ranks to the whole. ``is_causal`` is top-left aligned in global
    positions. ``mode``: "ring" (K/V blocks passed around the ring, partials merged exactly) or "ulysses"
    (all-to-all to head shards; needs Hq and Hkv divisible by the group size). Works under torch.func.jvp
    and torch.autograd.forward_ad with a differentiable tangent; gradients reach q, k, v. Every rank of
    ``group`` must call it with the same options. Inside ``torch.autocast`` the inputs and a float mask are
    cast to the autocast dtype first, as SDPA's are.
    """
    primals, tangents = unpack_duals(q, k, v)
    if all(isinstance(x, torch.Tensor) for x in (q, k, v)) and any(t is not None for t in tangents):
        tangents = [zeros_if_none(t, p) for t, p in zip(tangents, primals)]
        o, to = _run(*primals, *tangents, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance)
        return make_dual(o, to)
    return _run(q, k, v, None, None, None, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance)


@follows_autocast("q", "k", "v", "attn_mask", tangents=(("tq", "q"), ("tk", "k"), ("tv", "v")))
def context_parallel_attention_jvp(q, k, v, tq, tk, tv, attn_mask=None, is_causal=False, scale=None,
                                   enable_gqa=False, *, group=None, mode: str = "ring",
                                   load_balance: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, tO) of :func:`context_parallel_attention` along the tangents (tq, tk, tv) (None = zero), each
    the shape of its primal shard; differentiable with respect to all six inputs.
    tO = tP V + P tV, tP = P * (tS - rowsum(P * tS)), tS = scale (tQ K^T + Q tK^T). Under ``torch.autocast``
    the inputs are cast to its dtype, each tangent with its primal.
    """
    tq, tk, tv = (zeros_if_none(t, x) for x, t in zip((q, k, v), (tq, tk, tv)))
    return _run(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance)
