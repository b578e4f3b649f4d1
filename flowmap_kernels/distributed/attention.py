"""Public context-parallel attention: ``context_parallel_attention`` and ``context_parallel_attention_jvp``."""
from __future__ import annotations

import struct

import torch
import torch.autograd.forward_ad as fwAD

from .._autodiff import apply_on_unpacked, follows_autocast, make_dual, on_unpacked_duals, unpack_duals, zeros_if_none
from ..attention import ATTENTION, make_problem
from ..attention.problem import SUPPORTED_DTYPES, mask_kind
from .comm import check_load_balance, exchange_checked, layout_from_lengths, world_and_rank
from .ring import RingAttentionFunction, RingAttentionJVPFunction, RingSpec
from .ulysses import ulysses_attention

MODES = ("ring", "ulysses")


_MASK_KINDS = (None, "bool", "float")
_MASK_DTYPES = (torch.bool,) + SUPPORTED_DTYPES
# The fields every rank sends before any other exchange (an all_gather of int64): its shard lengths, whether its
# arguments passed the checks, and what must agree across ranks. ``mask_rows``: -1 no mask, 0 one row broadcast
# over this rank's query rows, 1 one row per query row, 2 either (one query row, one mask row). ``tangents``: 1 for
# a call with tangents (jvp), 0 without; ``mask_dtype``, ``mask_batch``, ``mask_heads``: the mask's dtype and
# (broadcast) dims, -1 no mask (the ring and all-to-all messages are sized by them and by ``tangents``: a
# mismatch would hang the ranks or abort them in gloo).
_FIELDS = ("q_len", "k_len", "dtype", "batch", "q_heads", "kv_heads", "head_dim", "v_head_dim", "mode",
           "is_causal", "load_balance", "enable_gqa", "scale", "mask_kind", "mask_rows", "mask_keys", "tangents",
           "mask_dtype", "mask_batch", "mask_heads")
# field that must agree: (what the error calls it, a rank's value as sent -> as the user wrote it)
_AGREE = {"dtype": ("dtype", SUPPORTED_DTYPES.__getitem__), "batch": ("batch size", int),
          "q_heads": ("query heads", int), "kv_heads": ("key/value heads", int), "head_dim": ("head_dim", int),
          "v_head_dim": ("value head_dim", int), "mode": ("mode", MODES.__getitem__), "is_causal": ("is_causal", bool),
          "load_balance": ("load_balance", bool), "enable_gqa": ("enable_gqa", bool),
          "scale": ("scale", lambda x: struct.unpack("<d", struct.pack("<q", x))[0]),
          "mask_kind": ("attn_mask (None, bool or float)", _MASK_KINDS.__getitem__),
          "tangents": ("tangents (a call with tangents: jvp / forward-mode, or without)", bool),
          "mask_dtype": ("attn_mask dtype", lambda x: None if x < 0 else _MASK_DTYPES[x]),
          "mask_batch": ("attn_mask batch dim", int), "mask_heads": ("attn_mask heads dim", int)}


def _check_mask(attn_mask, q, is_causal):
    """The mask as a 4-d (Bm, Hm, Lq_local or 1, Lk or 1) tensor, checked against this rank's query shard (its
    key dim against every rank's keys after the exchange)."""
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
    want = (q.shape[0], q.shape[1], q.shape[2])
    if any(s not in (1, w) for s, w in zip(m.shape[:3], want)):
        raise ValueError(f"attn_mask: shape {tuple(attn_mask.shape)} must broadcast to (batch, heads, local query "
                         f"rows, all keys) = {(*want, 'Lk')}: this rank's query rows against the keys of every rank, "
                         f"in global key order")
    return m


def _local_checks(q, k, v, tangents, attn_mask, is_causal, scale, enable_gqa, mode, load_balance):
    """(problem, mask) from this rank's arguments; TypeError / ValueError naming the bad one."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_load_balance(load_balance)
    p = make_problem(q, k, v, None, 0.0, False, scale, enable_gqa, tangents=tangents)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal: expected a bool, got {type(is_causal).__name__}")
    return p, _check_mask(attn_mask, q, is_causal)


def _signature(p, mask, q, mode, is_causal, load_balance, enable_gqa, tangents) -> list:
    """This rank's record, the values of _FIELDS in order."""
    mask_rows = -1 if mask is None else (2 if mask.shape[2] == 1 == q.shape[2] else int(mask.shape[2] != 1))
    return [p.q_len, p.kv_len, SUPPORTED_DTYPES.index(p.dtype), p.batch, p.q_heads, p.kv_heads, p.head_dim,
            p.v_head_dim, MODES.index(mode), int(is_causal), int(load_balance), int(bool(enable_gqa)),
            struct.unpack("<q", struct.pack("<d", p.scale))[0],
            _MASK_KINDS.index(None if mask is None else mask_kind(mask, q)), mask_rows,
            -1 if mask is None else mask.shape[3], int(bool(tangents)),
            *((-1, -1, -1) if mask is None else (_MASK_DTYPES.index(mask.dtype), mask.shape[0], mask.shape[1]))]


def _agree(rows: list) -> None:
    """ValueError (on every rank alike) naming the first field in which the ranks' records differ."""
    for name, (label, decode) in _AGREE.items():
        values = [row[name] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(f"{label}: every rank of the group must call context-parallel attention alike; got "
                             f"{', '.join(f'rank {r}: {decode(x)}' for r, x in enumerate(values))}")


def _ring_backend(q, k, v, scale, enable_gqa, mask, is_causal) -> str:
    p = make_problem(q, k, v, None, 0.0, False, scale, enable_gqa)
    kind = "bool" if is_causal else (None if mask is None else mask_kind(mask, q))
    name = ATTENTION.resolve(None, **dict(p.as_dict(), mask_kind=kind)).backend
    return "torch" if name == "naive" else name  # the ring needs the fused kernels' (O, lse, mu) partials


def _prepare(q, k, v, tangents, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance):
    """Check the arguments and exchange the shard lengths: (problem, world, rank, q layout, k layout, mask,
    mask_rows). The exchange comes first, so that an error on one rank is raised on every rank (none waits in
    a collective for the others); it also checks that the ranks' calls agree."""
    world, rank = world_and_rank(group)
    local = {}

    def check() -> list:
        local["p"], local["mask"] = _local_checks(q, k, v, tangents, attn_mask, is_causal, scale, enable_gqa, mode,
                                                  load_balance)
        return _signature(local["p"], local["mask"], q, mode, is_causal, load_balance, enable_gqa, tangents)

    rows = [dict(zip(_FIELDS, row))
            for row in exchange_checked("context-parallel attention", check, len(_FIELDS), group, world, q)]
    p, mask = local["p"], local["mask"]
    _agree(rows)
    q_layout = layout_from_lengths("query", [row["q_len"] for row in rows], world, load_balance)
    k_layout = layout_from_lengths("key", [row["k_len"] for row in rows], world, load_balance)
    keys = {row["mask_keys"] for row in rows} - {1, k_layout.total}
    if mask is not None and keys:
        raise ValueError(f"attn_mask: its last dim must be 1 or all {k_layout.total} keys on every rank, got "
                         f"{sorted(keys)} (this rank: {mask.shape[3]})")
    states = {row["mask_rows"] for row in rows}
    if {0, 1} <= states:
        raise ValueError("attn_mask: some ranks pass one mask row per query row, others one row broadcast over "
                         "their rows; every rank must do the same")
    mask_rows = mask is not None and 0 not in states  # (one query row with one mask row reads as either)
    if mode == "ulysses":
        for name, h in (("query", p.q_heads), ("key", p.kv_heads)):
            if h % world:
                raise ValueError(f"{name}: mode='ulysses' splits heads over the {world} ranks of the group; "
                                 f"{h} heads are not divisible by {world} (use mode='ring')")
    return p, world, rank, q_layout, k_layout, mask, mask_rows


def ring_spec(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, group=None,
              load_balance=False) -> tuple[RingSpec, "torch.Tensor | None"]:
    """The (RingSpec, normalised mask) that ``context_parallel_attention`` hands to the ring Functions."""
    p, world, rank, q_layout, k_layout, mask, mask_rows = _prepare(q, k, v, (), attn_mask, is_causal, scale,
                                                                   enable_gqa, group, "ring", load_balance)
    return _ring_spec(p, world, rank, q_layout, k_layout, mask, mask_rows, q, k, v, group, is_causal,
                      enable_gqa), mask


def _ring_spec(p, world, rank, q_layout, k_layout, mask, mask_rows, q, k, v, group, is_causal,
               enable_gqa) -> RingSpec:
    return RingSpec(group, world, rank, q_layout, k_layout, is_causal, p.scale,
                    _ring_backend(q, k, v, p.scale, enable_gqa, mask, is_causal),
                    mask_rows=mask_rows,
                    mask_cols=mask is not None and mask.shape[3] != 1)


def _run(q, k, v, tq, tk, tv, attn_mask, is_causal, scale, enable_gqa, group, mode, load_balance):
    """O (tangents None) or (O, tO) through the autograd-tracked mode implementation."""
    tangents = () if tq is None else (tq, tk, tv)
    p, world, rank, q_layout, k_layout, mask, mask_rows = _prepare(q, k, v, tangents, attn_mask, is_causal, scale,
                                                                   enable_gqa, group, mode, load_balance)
    if mode == "ulysses":
        return ulysses_attention(q, k, v, tq, tk, tv, mask, mask_rows, is_causal, p.scale, enable_gqa, group,
                                 q_layout, k_layout)
    spec = _ring_spec(p, world, rank, q_layout, k_layout, mask, mask_rows, q, k, v, group, is_causal, enable_gqa)
    if tq is None:
        o, _ = RingAttentionFunction.apply(q, k, v, mask, spec)
        return o
    o, to, _, _ = apply_on_unpacked(RingAttentionJVPFunction, q, k, v, tq, tk, tv, mask, spec)
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
        with on_unpacked_duals():  # (forward-over-reverse: the backward re-attaches the tangents, see _autodiff)
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
