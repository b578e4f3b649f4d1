"""Functions run on every rank of a spawned gloo group (see harness.py); each returns plain data for the test.

Every rank builds the same full float64 tensors from a seed, takes its shards with ``shard_sequence``,
runs the context-parallel op and compares its shard of O, tO and of the six gradients with the float64
reference of tests.reference (math attention, torch.func.jvp, autograd). Errors are reduced with MAX
over the ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist

import flowmap_kernels.distributed as fkd
from flowmap_kernels.attention import kernels
from tests.attention.cases import Case
from tests.numerics import rel_err
from tests.reference import loss_on_outputs, random_parameters_, ref_attention, ref_grads, ref_jvp


@dataclass
class CPCase(Case):
    """The attention Case geometry (tests/attention/cases.py) plus what context parallelism adds; its tensors
    come from ``_full_tensors`` (full sequences, sharded per rank), whose masks are "bool", "bool_rows"
    (broadcast over heads, dead rows), "float" and "keys_only". Build with :meth:`of`."""
    load_balance: bool = False
    dtype: torch.dtype = torch.float64
    name: str = field(default="", compare=False)

    @classmethod
    def of(cls, **kw) -> "CPCase":
        """A case with the context-parallel defaults (4 heads, 13 tokens, head dim 8) unless given."""
        return cls(**{**dict(q_heads=4, kv_heads=4, q_len=13, kv_len=13, head_dim=8), **kw})

    @property
    def kwargs(self):
        return dict(is_causal=self.causal, enable_gqa=self.q_heads != self.kv_heads)


def _full_tensors(case: CPCase):
    g = torch.Generator().manual_seed(case.seed)
    B, Hq, Hkv, Lq, Lk, D = case.batch, case.q_heads, case.kv_heads, case.q_len, case.kv_len, case.head_dim
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(q=r(B, Hq, Lq, D), k=r(B, Hkv, Lk, D), v=r(B, Hkv, Lk, D + 2))
    t.update(tq=r(B, Hq, Lq, D), tk=r(B, Hkv, Lk, D), tv=r(B, Hkv, Lk, D + 2))
    t.update(wo=r(B, Hq, Lq, D + 2), wt=r(B, Hq, Lq, D + 2))
    mask = None
    if case.mask == "bool":
        mask = torch.rand(B, Hq, Lq, Lk, generator=g) > 0.4
    elif case.mask == "bool_rows":  # broadcast over heads; rows 0 and Lq-2 have no allowed key
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.5
        mask[:, :, 0] = False
        mask[:, :, Lq - 2] = False
    elif case.mask == "float":
        mask = torch.randn(1, Hq, Lq, Lk, generator=g, dtype=torch.float64)
        mask[..., 1, :] = float("-inf")  # a fully masked row
    elif case.mask == "keys_only":  # (1, 1, 1, Lk): broadcast over rows
        mask = torch.rand(1, 1, 1, Lk, generator=g) > 0.3
    elif case.mask == "float_rows":  # (B, 1, Lq, Lk): shared by the heads
        mask = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64)
    elif case.mask == "float_keys":  # (1, 1, 1, Lk): a key bias, broadcast over rows and heads
        mask = torch.randn(1, 1, 1, Lk, generator=g, dtype=torch.float64)
    elif case.mask == "float_head_keys":  # (1, Hq, 1, Lk): per head, broadcast over rows
        mask = torch.randn(1, Hq, 1, Lk, generator=g, dtype=torch.float64)
    if mask is not None and mask.dtype == torch.float64:
        mask = mask.to(case.dtype)
    t = {n: x.to(case.dtype) for n, x in t.items()}  # the reference runs on these values in float64
    t["mask"] = mask
    return t


def _local_mask(mask, group, load_balance):
    if mask is None or mask.shape[2] == 1:
        return mask
    return fkd.shard_sequence(mask, group, dim=2, load_balance=load_balance)


PATHS = ("func.jvp", "forward_ad", "explicit")


def _cp_jvp(path, q, k, v, tq, tk, tv, mask, kw):
    if path == "func.jvp":
        return torch.func.jvp(lambda a, b, c: fkd.context_parallel_attention(a, b, c, mask, **kw), (q, k, v),
                              (tq, tk, tv))
    if path == "forward_ad":
        with fwAD.dual_level():
            duals = [fwAD.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))]
            out = fwAD.unpack_dual(fkd.context_parallel_attention(*duals, mask, **kw))
            return out.primal, out.tangent
    return fkd.context_parallel_attention_jvp(q, k, v, tq, tk, tv, mask, **kw)


def _max_over_ranks(errors: dict) -> dict:
    keys = sorted(errors)
    t = torch.tensor([errors[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def _count_kernels():
    """Wrap the four kernel ops (as the ring calls them) to count calls; returns (counts, restore)."""
    counts, saved = {}, {}
    for name in ("attention_forward", "attention_backward", "attention_jvp_forward", "attention_jvp_backward"):
        real = saved[name] = getattr(kernels, name)

        def spy(*a, _real=real, _name=name):
            counts[_name] = counts.get(_name, 0) + 1
            return _real(*a)
        setattr(kernels, name, spy)

    def restore():
        for name, real in saved.items():
            setattr(kernels, name, real)
    return counts, restore


def attention_cases(rank, world, cases, modes=("ring", "ulysses"), group=None):
    """{(case name, mode): {quantity/path: max relative error over ranks}} plus kernel-call counts.
    ``group``: the process group to shard over (None: the default group); ``rank``, ``world`` are this
    process's rank in it and its size."""
    out = {}
    for case in cases:
        t = _full_tensors(case)
        kw_ref = dict(case.kwargs)
        if t["mask"] is not None:
            kw_ref["attn_mask"] = t["mask"]
        (ro, rto), rgrads = ref_grads(t["q"], t["k"], t["v"], t["tq"], t["tk"], t["tv"], t["wo"], t["wt"], **kw_ref)
        lb = case.load_balance
        shard = lambda x: fkd.shard_sequence(x, group, dim=2, load_balance=lb)  # noqa: E731
        ro_l, rto_l = shard(ro), shard(rto)
        rgrads_l = [shard(g) for g in rgrads]
        wo, wt = shard(t["wo"]), shard(t["wt"])
        mask = _local_mask(t["mask"], group, lb)
        for mode in modes:
            if mode == "ulysses" and (case.q_heads % world or case.kv_heads % world):
                continue
            kw = dict(case.kwargs, group=group, mode=mode, load_balance=lb)
            errors = {}
            for path in PATHS:
                leaves = [shard(t[n]).requires_grad_() for n in ("q", "k", "v", "tq", "tk", "tv")]
                o, to = _cp_jvp(path, *leaves, mask, kw)
                errors[f"o/{path}"] = rel_err(o, ro_l)
                errors[f"to/{path}"] = rel_err(to, rto_l)
                grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves)
                for n, a, b in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, rgrads_l):
                    errors[f"{n}/{path}"] = rel_err(a, b)
            # primal path: gradients of a loss on O alone, against float64 autograd of the reference
            leaves = [shard(t[n]).requires_grad_() for n in ("q", "k", "v")]
            full = [t[n].clone().requires_grad_() for n in ("q", "k", "v")]
            ref_o = ref_attention(*full, **kw_ref)
            ref_g = torch.autograd.grad((ref_o * t["wo"]).sum(), full)
            counts, restore = _count_kernels()
            try:
                o = fkd.context_parallel_attention(*leaves, mask, **kw)
                grads = torch.autograd.grad((o * wo).sum(), leaves)
            finally:
                restore()
            errors["o/primal"] = rel_err(o, shard(ref_o.detach()))
            for n, a, b in zip(("dq", "dk", "dv"), grads, ref_g):
                errors[f"{n}/primal"] = rel_err(a, shard(b))
            errors = _max_over_ranks(errors)  # over all processes (every group runs the same cases)
            errors["_primal_used_jvp_kernels"] = float(counts.get("attention_jvp_forward", 0)
                                                       + counts.get("attention_jvp_backward", 0))
            errors["_primal_forward_calls"] = float(counts.get("attention_forward", 0))
            out[(case.name, mode)] = errors
    return out


def mask_grad_cases(rank, world, cases, modes=("ring", "ulysses")):
    """{(case name, mode): {quantity/path: max relative error over ranks}} for a float mask that requires grad
    (a learned bias): O, tO and the gradients of q, k, v, their tangents and the mask, from a loss on (O, tO)
    and, on the primal path, on O alone. A mask with per-row entries holds this rank's rows: its gradient is
    this rank's rows of the reference's. One broadcast over the rows is held whole by every rank: the ranks'
    gradients sum (all_reduce) to the reference's."""
    out = {}
    for case in cases:
        t = _full_tensors(case)
        kw_ref = dict(case.kwargs)
        full = [t[n].clone().requires_grad_() for n in ("q", "k", "v", "tq", "tk", "tv")]
        ref_mask = t["mask"].clone().requires_grad_()
        ro, rto = ref_jvp(*full, **kw_ref, attn_mask=ref_mask)
        rgrads = torch.autograd.grad(loss_on_outputs(ro, rto, t["wo"], t["wt"]), full + [ref_mask])
        ref_o = ref_attention(*full[:3], **kw_ref, attn_mask=ref_mask)
        rgrads_primal = torch.autograd.grad((ref_o * t["wo"]).sum(), full[:3] + [ref_mask])
        lb = case.load_balance
        shard = lambda x: fkd.shard_sequence(x, None, dim=2, load_balance=lb)  # noqa: E731
        wo, wt = shard(t["wo"]), shard(t["wt"])

        def mask_err(local_grad, ref_grad):
            if t["mask"].shape[2] == 1:
                total = local_grad.detach().clone()
                dist.all_reduce(total)
                return rel_err(total, ref_grad)
            return rel_err(local_grad, shard(ref_grad))

        for mode in modes:
            if mode == "ulysses" and (case.q_heads % world or case.kv_heads % world):
                continue
            kw = dict(case.kwargs, mode=mode, load_balance=lb)
            errors = {}
            for path in ("func.jvp", "explicit"):
                leaves = [shard(t[n]).requires_grad_() for n in ("q", "k", "v", "tq", "tk", "tv")]
                mask = _local_mask(t["mask"], None, lb).clone().requires_grad_()
                o, to = _cp_jvp(path, *leaves, mask, kw)
                errors[f"o/{path}"] = rel_err(o, shard(ro.detach()))
                errors[f"to/{path}"] = rel_err(to, shard(rto.detach()))
                grads = torch.autograd.grad(loss_on_outputs(o, to, wo, wt), leaves + [mask])
                for n, a, b in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, rgrads):
                    errors[f"{n}/{path}"] = rel_err(a, shard(b))
                errors[f"dmask/{path}"] = mask_err(grads[6], rgrads[6])
            leaves = [shard(t[n]).requires_grad_() for n in ("q", "k", "v")]
            mask = _local_mask(t["mask"], None, lb).clone().requires_grad_()
            o = fkd.context_parallel_attention(*leaves, mask, **kw)
            grads = torch.autograd.grad((o * wo).sum(), leaves + [mask])
            errors["o/primal"] = rel_err(o, shard(ref_o.detach()))
            for n, a, b in zip(("dq", "dk", "dv"), grads, rgrads_primal):
                errors[f"{n}/primal"] = rel_err(a, shard(b))
            errors["dmask/primal"] = mask_err(grads[3], rgrads_primal[3])
            out[(case.name, mode)] = _max_over_ranks(errors)
    return out


def shard_gather_checks(rank, world):
    """Round trips and the gradient / tangent of gather_sequence; returns {check: value}."""
    res = {}
    g = torch.Generator().manual_seed(5)
    for L in (world * 2 + 3, 1, world * 4):
        for lb in (False, True):
            x = torch.randn(2, L, 3, generator=g, dtype=torch.float64)
            local = fkd.shard_sequence(x, dim=1, load_balance=lb)
            n = 2 * world if lb else world
            chunks = torch.tensor_split(x, n, dim=1)
            want = torch.cat([chunks[rank], chunks[n - 1 - rank]], 1) if lb else chunks[rank]
            res[f"shard_L{L}_lb{lb}"] = float(torch.equal(local, want))
            back = fkd.gather_sequence(local, dim=1, load_balance=lb)
            res[f"roundtrip_L{L}_lb{lb}"] = float(torch.equal(back, x))
            # backward of gather = reduce-scatter (sum over ranks): rank-dependent upstream gradient
            w = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
            local = local.detach().requires_grad_()
            (gl,) = torch.autograd.grad((fkd.gather_sequence(local, dim=1, load_balance=lb) * w).sum(), local)
            total = w.clone()
            dist.all_reduce(total)
            res[f"gather_grad_L{L}_lb{lb}"] = float(torch.allclose(gl, fkd.shard_sequence(total, dim=1,
                                                                                     load_balance=lb)))
            # forward mode through gather: the tangent is gathered as well
            tx = torch.randn(x.shape, generator=g, dtype=torch.float64)
            _, tout = torch.func.jvp(lambda a: fkd.gather_sequence(a, dim=1, load_balance=lb),
                                     (fkd.shard_sequence(x, dim=1, load_balance=lb),),
                                     (fkd.shard_sequence(tx, dim=1, load_balance=lb),))
            res[f"gather_tangent_L{L}_lb{lb}"] = float(torch.equal(tout, tx))
    t = torch.tensor([res[k] for k in sorted(res)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return dict(zip(sorted(res), t.tolist()))


def _raises(fn, exc, text):
    try:
        fn()
    except exc as e:
        return text in str(e)
    return False


def error_checks(rank, world):
    """Bad input gives a clear error on every rank; {check: passed}."""
    q = torch.randn(1, 3, 4, 8, dtype=torch.float64)
    res = {}
    res["ulysses_heads"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, mode="ulysses"), ValueError,
                                   "not divisible")
    res["mode"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, mode="tree"), ValueError, "mode")
    bad = torch.randn(1, 3, 4 + rank, 8, dtype=torch.float64)  # not a tensor_split sharding
    res["bad_shards"] = _raises(lambda: fkd.context_parallel_attention(bad, bad, bad), ValueError, "query")
    m = torch.ones(1, 1, 4, 5, dtype=torch.bool)  # keys must be all 4 * world
    res["mask_shape"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, m), ValueError, "attn_mask")
    m = torch.ones(1, 1, 4, 4 * world, dtype=torch.bool)
    res["mask_causal"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, m, is_causal=True), ValueError,
                                 "is_causal")
    q4 = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    res["gqa_flag"] = _raises(lambda: fkd.context_parallel_attention(q4, q4[:, :2], q4[:, :2]), ValueError,
                              "enable_gqa")
    res["dim"] = _raises(lambda: fkd.shard_sequence(q, dim=4), ValueError, "dim")
    from flowmap_kernels.nn import dit_tiny
    res["switch_needs_dit"] = _raises(lambda: fkd.context_parallel(torch.nn.Linear(2, 2)), ValueError, "DiT")
    res["switch_ulysses_heads"] = _raises(lambda: fkd.context_parallel(dit_tiny(hidden_size=48, num_heads=3),
                                                                      mode="ulysses"), ValueError, "num_heads")
    res["switch_mode"] = _raises(lambda: fkd.context_parallel(dit_tiny(), mode="rings"), ValueError, "mode")
    res["not_a_tensor"] = _raises(lambda: fkd.context_parallel_attention(q, [1.0], q), TypeError, "key")
    res["tangent_shape"] = _raises(lambda: fkd.context_parallel_attention_jvp(q, q, q, q[..., :4], None, None),
                                   ValueError, "tangent of query")
    res["float_mask_dtype"] = _raises(lambda: fkd.context_parallel_attention(
        q, q, q, torch.zeros(1, 1, 4, 4 * world, dtype=torch.float16)), ValueError, "attn_mask")  # SDPA refuses it
    # one rank's bad argument stops every rank (none is left waiting in a collective)
    m = torch.ones(1, 1, 4, 4 * world + (rank == 1), dtype=torch.bool)
    res["one_rank_bad_mask_keys"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, m), ValueError,
                                            "attn_mask: its last dim must be 1 or all")
    m = torch.ones(1, 1, 4 + (rank == 1), 4 * world, dtype=torch.bool)
    res["one_rank_bad_mask_rows"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, m), ValueError,
                                            "attn_mask: shape" if rank == 1 else "rank(s) [1] of the group")
    # calls that differ between ranks are named on every rank
    qr = q.float() if rank == 1 else q
    res["dtype_differs"] = _raises(lambda: fkd.context_parallel_attention(qr, qr, qr), ValueError,
                                   "rank 1: torch.float32")
    q4d = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    res["mode_differs"] = _raises(lambda: fkd.context_parallel_attention(
        q4d, q4d, q4d, mode="ulysses" if rank == 1 else "ring"), ValueError, "mode: every rank")
    res["causal_differs"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, is_causal=rank == 1),
                                    ValueError, "is_causal: every rank")
    res["scale_differs"] = _raises(lambda: fkd.context_parallel_attention(q, q, q, scale=0.5 + rank), ValueError,
                                   "scale: every rank")
    # what sizes the ring / all-to-all messages must agree too (a mismatch hung the ring, aborted gloo in Ulysses)
    for mode in ("ring", "ulysses"):
        qm = q4d
        res[f"tangents_differ_{mode}"] = _raises(
            lambda: (fkd.context_parallel_attention_jvp(qm, qm, qm, qm, None, None, mode=mode) if rank == 1
                     else fkd.context_parallel_attention(qm, qm, qm, mode=mode)), ValueError, "tangents")
        for what, m in (("heads", torch.zeros(1, 4 if rank == 1 else 1, 4, 4 * world, dtype=torch.float64)),
                        ("batch", torch.ones(2 if rank == 1 else 1, 1, 4, 4 * world, dtype=torch.bool)),
                        ("dtype", torch.zeros(1, 1, 4, 4 * world,
                                              dtype=torch.float32 if rank == 1 else torch.float64))):
            qb = torch.randn(2, 4, 4, 8, dtype=torch.float64)
            res[f"mask_{what}_differ_{mode}"] = _raises(
                lambda: fkd.context_parallel_attention(qb, qb, qb, m, mode=mode), ValueError, f"attn_mask {what}")
    # gather_sequence: shards whose dtype or other dims differ (aborted gloo), or load_balance that differs
    # (reassembled in the wrong order on some ranks), are named on every rank
    for what, x in (("dtype", q.float() if rank == 1 else q), ("shape", q[..., :4] if rank == 1 else q),
                    ("ndim", q.reshape(3, 4, 8) if rank == 1 else q)):
        res[f"gather_{what}_differs"] = _raises(lambda: fkd.gather_sequence(x, dim=1), ValueError,
                                                "x_local: every rank of the group")
    lb_local = fkd.shard_sequence(torch.arange(8.0)[None], dim=1, load_balance=True)
    res["gather_load_balance_differs"] = _raises(lambda: fkd.gather_sequence(lb_local, dim=1, load_balance=rank == 1),
                                                 ValueError, "load_balance: every rank")
    for name, call in (("attention", lambda: fkd.context_parallel_attention(q, q, q, load_balance="no")),
                       ("shard", lambda: fkd.shard_sequence(q, load_balance="no")),
                       ("gather", lambda: fkd.gather_sequence(q, load_balance=1)),
                       ("switch", lambda: fkd.context_parallel(dit_tiny(), load_balance="no"))):
        res[f"load_balance_type_{name}"] = _raises(call, TypeError, "load_balance: expected a bool")
    # gather_sequence: an argument only rank 1 gets wrong is raised there and named on the others (none waits)
    for what, call in (("load_balance", lambda: fkd.gather_sequence(q, dim=1, load_balance=1 if rank == 1 else False)),
                       ("dim", lambda: fkd.gather_sequence(q, dim=7 if rank == 1 else 1))):
        res[f"gather_one_rank_bad_{what}"] = _raises(call, (TypeError, ValueError),
                                                     what if rank == 1 else "rank(s) [1] of the group")
    # a second switch of a switched model is refused (removing the handles out of order left it switched)
    model = dit_tiny()
    with fkd.context_parallel(model):
        res["switch_twice"] = _raises(lambda: fkd.context_parallel(model, mode="ulysses"), ValueError,
                                      "already switched")
    res["switch_again_after_remove"] = not _raises(lambda: fkd.context_parallel(model).remove(), ValueError, "")
    # a switched DiT: an argument only rank 1 gets wrong is raised there and named on the others (they waited in
    # the blocks' attention before); inputs whose shapes or optional parts differ are named on every rank
    x, s, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with fkd.context_parallel(model):
        for what, args, message in (
                ("x", (x[:, :, :6] if rank == 1 else x, s, s, y), "x: expected"),
                ("s", (x, s[:1] if rank == 1 else s, s, y), "s: expected"),
                ("y", (x, s, s, y.float() if rank == 1 else y), "y: expected"),
                ("w", (x, s, s, y, 2.0 if rank == 1 else None), "w: this DiT")):
            res[f"dit_one_rank_bad_{what}"] = _raises(lambda: model(*args), ValueError,
                                                      message if rank == 1 else "rank(s) [1] of the group")
        for what, args in (("batch", (x[:1], s[:1], s[:1], y[:1]) if rank == 1 else (x, s, s, y)),
                           ("labels", (x, s, s, None if rank == 1 else y)),
                           ("dtype", (x.double(), s.double(), s.double(), y) if rank == 1 else (x, s, s, y))):
            res[f"dit_inputs_differ_{what}"] = _raises(lambda: model(*args), ValueError,
                                                       "DiT: under context parallelism every rank")
        res["dit_agreeing_call_runs"] = model(x, s, s, y).shape == x.shape
    # torch.func.jvp under no_grad with primals requiring grad: plain results, as fk.attention's
    q4g = torch.randn(1, 4, 4, 8, dtype=torch.float64, requires_grad=True)
    for mode in ("ring", "ulysses"):
        with torch.no_grad():
            o, to = torch.func.jvp(lambda a: fkd.context_parallel_attention(a, a, a, mode=mode), (q4g,),
                                   (torch.ones_like(q4g),))
        res[f"no_grad_jvp_plain_{mode}"] = not (o.requires_grad or to.requires_grad)
    return res


def dit_checks(rank, world, configs):
    """DiT with context parallelism against the single-process model, float64: output, tangent
    (torch.func.jvp along (v, 0, 1)) and gradients of a loss on both (averaged over the group).
    configs: (mode, load_balance, checkpoint_blocks) triples."""
    from flowmap_kernels.nn import dit_tiny
    from tests.numerics import rel_err as rerr

    out = {}
    for mode, lb, ckpt in configs:
        torch.manual_seed(0)
        model = dit_tiny(hidden_size=32, num_heads=4, depth=2, input_size=10, patch_size=2,
                         checkpoint_blocks=ckpt).double()
        g = torch.Generator().manual_seed(1)
        random_parameters_(model, g, 0.2)
        x = torch.randn(2, 1, 10, 10, generator=g, dtype=torch.float64)
        s, t = torch.rand(2, generator=g, dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64)
        y = torch.tensor([3, 7])
        tx = torch.randn(x.shape, generator=g, dtype=torch.float64)

        def run():
            model.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            v, tv = torch.func.jvp(lambda a, b, c: model(a, b, c, y), (xx, s, t),
                                   (tx, torch.zeros_like(s), torch.ones_like(t)))
            loss = (v * tv).sum() + 0.5 * (tv ** 2).sum()
            loss.backward()
            grads = [p.grad.clone() for p in model.parameters()] + [xx.grad.clone()]
            return v.detach(), tv.detach(), grads

        v0, tv0, g0 = run()
        with fkd.context_parallel(model, None, mode=mode, load_balance=lb):
            v1, tv1, g1 = run()
        for gr in g1:
            dist.all_reduce(gr)
            gr /= world
        errs = {"v": rerr(v1, v0), "tv": rerr(tv1, tv0), "grads": max(rerr(a, b) for a, b in zip(g1, g0))}
        errs["switched_off"] = float(model.blocks[0].attn.context_parallel_config is None)
        out[(mode, lb, ckpt)] = _max_over_ranks(errs)
    return out


def ring_jvp_rule_check(rank, world):
    """The primal ring Function's own forward-mode rule (used when a forward-mode level is invisible to
    ``context_parallel_attention``'s dual unpacking): tangent and gradients through it vs the reference."""
    from flowmap_kernels.distributed.attention import ring_spec
    from flowmap_kernels.distributed.ring import RingAttentionFunction

    case = CPCase.of(causal=True, load_balance=True, q_len=11, kv_len=11, batch=1, q_heads=2, kv_heads=2)
    t = _full_tensors(case)
    (ro, rto), rgrads = ref_grads(t["q"], t["k"], t["v"], t["tq"], t["tk"], t["tv"], t["wo"], t["wt"], is_causal=True)
    shard = lambda x: fkd.shard_sequence(x, None, dim=2, load_balance=True)  # noqa: E731
    leaves = [shard(t[n]).requires_grad_() for n in ("q", "k", "v", "tq", "tk", "tv")]
    spec, mask = ring_spec(*leaves[:3], is_causal=True, load_balance=True)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, tx) for x, tx in zip(leaves[:3], leaves[3:])]
        o, _ = RingAttentionFunction.apply(*duals, mask, spec)
        o, to = fwAD.unpack_dual(o)
    errors = {"o": rel_err(o, shard(ro)), "to": rel_err(to, shard(rto))}
    grads = torch.autograd.grad(loss_on_outputs(o, to, shard(t["wo"]), shard(t["wt"])), leaves)
    for n, a, b in zip(("dq", "dk", "dv", "dtq", "dtk", "dtv"), grads, rgrads):
        errors[n] = rel_err(a, shard(b))
    return _max_over_ranks(errors)


def subgroup_cases(rank, world, cases):
    """attention_cases on two process groups of world/2 ranks each, run side by side."""
    half = world // 2
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, world)))]
    return attention_cases(rank % half, half, cases, group=groups[rank // half])


def functional_grad_check(rank, world):
    """torch.func.grad of a loss on torch.func.jvp of the context-parallel attention (pure function
    transforms, no .backward), ring and Ulysses, against the reference gradient for q."""
    case = CPCase.of(causal=True, q_len=9, kv_len=9, batch=1, q_heads=2, kv_heads=2)
    t = _full_tensors(case)
    (_, _), rgrads = ref_grads(t["q"], t["k"], t["v"], t["tq"], t["tk"], t["tv"], t["wo"], t["wt"], is_causal=True)
    shard = lambda x: fkd.shard_sequence(x, None, dim=2)  # noqa: E731
    q, k, v, tq, tk, tv, wo, wt = (shard(t[n]) for n in ("q", "k", "v", "tq", "tk", "tv", "wo", "wt"))
    errors = {}
    for mode in ("ring", "ulysses"):
        def loss(q_):
            o, to = torch.func.jvp(lambda a, b, c: fkd.context_parallel_attention(a, b, c, is_causal=True, mode=mode),
                                   (q_, k, v), (tq, tk, tv))
            return loss_on_outputs(o, to, wo, wt)
        errors[mode] = rel_err(torch.func.grad(loss)(q), shard(rgrads[0]))
    return _max_over_ranks(errors)


def forward_over_forward_check(rank, world):
    """Nested torch.func.jvp (forward-over-forward) of the context-parallel attention: Ulysses against the
    reference's (y, ty, dy, dty); the ring refuses it with a clear error. {quantity or "ring_error": value}."""
    from tests.reference import jvp_of_jvp
    g = torch.Generator().manual_seed(4)
    full = [torch.randn(1, 4, 10, 8, generator=g, dtype=torch.float64) for _ in range(9)]
    shard = lambda x: fkd.shard_sequence(x, None, dim=2)  # noqa: E731
    ref = jvp_of_jvp(lambda a, b, c: ref_attention(a, b, c, is_causal=True), full[:3], full[3:6], full[6:])
    local = [[shard(x) for x in full[i:i + 3]] for i in (0, 3, 6)]
    out = {}
    for mode in ("ring", "ulysses"):
        f = lambda a, b, c: fkd.context_parallel_attention(a, b, c, is_causal=True, mode=mode)  # noqa: E731
        if mode == "ring":
            out["ring_error"] = float(_raises(lambda: jvp_of_jvp(f, *local), NotImplementedError, "mode='ulysses'"))
            continue
        (y, ty), (dy, dty) = jvp_of_jvp(f, *local)
        for n, a, b in zip(("y", "ty", "dy", "dty"), (y, ty, dy, dty), (*ref[0], *ref[1])):
            out[n] = rel_err(a, shard(b))
    # forward-over-reverse (a Hessian-vector product by forward_ad over autograd.grad(create_graph=True)):
    # Ulysses against the reference's; the ring refuses it (its gradients carried no tangent, silently)
    q, k, v, u, w = full[0], full[1], full[2], full[3], full[4]
    ref_hvp = torch.func.jvp(torch.func.grad(lambda a: (ref_attention(a, k, v, is_causal=True) * w).sum()), (q,),
                             (u,))[1]
    for mode in ("ring", "ulysses"):
        def hvp():
            ql = shard(q).requires_grad_()
            with fwAD.dual_level():
                o = fkd.context_parallel_attention(fwAD.make_dual(ql, shard(u)), shard(k), shard(v), is_causal=True,
                                                   mode=mode)
                dq, = torch.autograd.grad((o * shard(w)).sum(), ql, create_graph=True)
                return fwAD.unpack_dual(dq).tangent
        if mode == "ring":
            out["ring_hvp_error"] = float(_raises(hvp, NotImplementedError, "mode='ulysses' has one"))
        else:
            out["hvp"] = rel_err(hvp(), shard(ref_hvp))
    return _max_over_ranks(out)


def autocast_check(rank, world):
    """Under torch.autocast (bfloat16) with a float32 query and a bfloat16 key / value, both modes: equal to the
    call on inputs cast by hand outside autocast (1.0 when bitwise equal), O and tO in bfloat16; and O, tO
    against the single-process float64 reference on the bfloat16-rounded inputs (worst relative error)."""
    case = CPCase.of(causal=True, q_len=12, kv_len=12, batch=1, q_heads=4, kv_heads=4, dtype=torch.float32)
    t = _full_tensors(case)
    shard = lambda x: fkd.shard_sequence(x.float(), None, dim=2)  # noqa: E731
    q, k, v, tq, tk, tv = (shard(t[n]) for n in ("q", "k", "v", "tq", "tk", "tv"))
    k, v, tk, tv = (x.bfloat16() for x in (k, v, tk, tv))
    rounded = [t[n].bfloat16().double() for n in ("q", "k", "v", "tq", "tk", "tv")]
    ro, rto = ref_jvp(*rounded, is_causal=True)  # single process, float64, whole sequence
    out, err = {}, {}
    for mode in ("ring", "ulysses"):
        def run(*xs):
            return torch.func.jvp(lambda a, b, c: fkd.context_parallel_attention(a, b, c, is_causal=True, mode=mode),
                                  xs[:3], xs[3:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, to = run(q, k, v, tq, tk, tv)
            o2, to2 = fkd.context_parallel_attention_jvp(q, k, v, tq, tk, tv, is_causal=True, mode=mode)
        want = run(*(x.bfloat16() for x in (q, k, v, tq, tk, tv)))
        same = all(torch.equal(a, b) for a, b in zip((o, to, o2, to2), (*want, *want)))
        out[mode] = -float(same and o.dtype == to.dtype == torch.bfloat16)
        err[mode] = max(rel_err(o, shard(ro)), rel_err(to, shard(rto)))
    same = {m: -x for m, x in _max_over_ranks(out).items()}  # the minimum over ranks
    return {"same": same, "error": _max_over_ranks(err)}


def empty_sequence_checks(rank, world):
    """Sequences of zero tokens (every shard empty) on both modes, as the local attention treats them: no
    keys give O = tO = 0, no queries an empty O; gradients of the right shapes, zero. ``gather_sequence``
    of an empty sequence. {check: 1.0 when it held} (Ulysses used to fail in torch.cat of no pieces)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 3, 4, generator=g, dtype=torch.float64)  # (4 heads: Ulysses on 2 or 4 ranks)
    res = {}
    for mode in ("ring", "ulysses"):
        for name, (lq, lk) in {"no_keys": (3, 0), "no_queries": (0, 3), "neither": (0, 0)}.items():
            ql, kl = q[:, :, :lq].clone().requires_grad_(), q[:, :, :lk].clone().requires_grad_()
            o, to = fkd.context_parallel_attention_jvp(ql, kl, kl, ql, kl, kl, mode=mode)
            grads = torch.autograd.grad((o * 2).sum() + to.sum(), (ql, kl), allow_unused=True, materialize_grads=True)
            o2 = fkd.context_parallel_attention(ql, kl, kl, mode=mode)
            res[f"{mode}_{name}"] = float(o.shape == o2.shape == ql.shape and not o.abs().sum() and not to.abs().sum()
                                          and all(a.shape == b.shape and not a.abs().sum()
                                                  for a, b in zip(grads, (ql, kl))))
    x = torch.randn(2, 0, 3, dtype=torch.float64).requires_grad_()
    local = fkd.shard_sequence(x, dim=1)
    full = fkd.gather_sequence(local, dim=1)
    (gx,) = torch.autograd.grad(full.sum(), x, materialize_grads=True)
    res["gather_empty"] = float(full.shape == x.shape and gx.shape == x.shape)
    return res
