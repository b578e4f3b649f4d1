"""Bytes each rank sends for context-parallel attention (ring and Ulysses), measured and by formula.

Spawns W gloo processes on the CPU (for each W given), runs one training step of attention on each
rank's shard, forward+JVP (``context_parallel_attention_jvp``) then the backward through (O, tO), and
the primal forward and backward, and counts the bytes every rank sends in the package's communication
wrappers (``flowmap_kernels.distributed.count_communication``). Each count is compared with the formula
of docs/scaling.md (:func:`formula`). The per-call exchange of shard lengths and call records (168 (W-1) bytes) is
reported as "metadata" and left out of the comparison.

    python benchmarks/cp_comm_volume.py [--world 2 4] [--seq 1024] [--heads 8] [--kv-heads HEADS]
        [--head-dim 64] [--v-head-dim 64] [--batch 1] [--dtype float32] [--causal] [--load-balance]
        [--out bench_out/cp_comm_volume.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flowmap_kernels.bench.harness import require_ints, require_output  # noqa: E402

MODES = ("ring", "ulysses")
PHASES = ("forward+jvp", "backward_through_jvp", "forward", "backward")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def formula(mode: str, phase: str, rank: int, world: int, cfg: dict) -> int:
    """Bytes rank ``rank`` sends (metadata excluded), from the sizes alone.

    cfg: batch, heads (Hq), kv_heads (Hkv), seq (L, queries and keys), head_dim (D), v_head_dim (Dv),
    elem (bytes per element of the inputs), acc (bytes per element of the ring's gradient accumulators:
    8 for float64, else 4), load_balance. Shard lengths L_j follow shard_sequence (tensor_split sizes).
    One rank (W = 1) sends nothing.
    """
    from flowmap_kernels.distributed import SequenceLayout

    if world == 1:
        return 0

    B, Hq, Hkv, D, Dv = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["v_head_dim"]
    e, a, W, r = cfg["elem"], cfg["acc"], world, rank
    layout = SequenceLayout(cfg["seq"], W, cfg["load_balance"])
    L = [layout.local_length(j) for j in range(W)]
    Lt = cfg["seq"]
    tangent = phase in ("forward+jvp", "backward_through_jvp")
    t = 2 if tangent else 1  # primal only, or primal and tangent of every tensor
    if mode == "ring":
        # the K/V block of every rank but the next one leaves this rank once (W-1 hops per block)
        kv_hops = sum(L[j] for j in range(W) if j != (r + 1) % W) * B * Hkv * (D + Dv) * t * e
        if phase in ("forward+jvp", "forward"):
            return kv_hops
        # backward: K/V again, plus the dK/dV(/dtK/dtV) accumulator of every block (W hops, the last home)
        return kv_hops + Lt * B * Hkv * (D + Dv) * t * a
    # ulysses: all-to-all sends (W-1)/W of each local sequence shard, and each head shard's rows of others
    seq_to_heads_in = lambda H, E: (W - 1) * (H // W) * L[r] * E * B  # noqa: E731
    heads_to_seq_out = lambda H, E: (H // W) * (Lt - L[r]) * E * B  # noqa: E731
    if phase in ("forward+jvp", "forward"):
        sent = seq_to_heads_in(Hq, D) + seq_to_heads_in(Hkv, D + Dv) + heads_to_seq_out(Hq, Dv)
    else:  # dO (dtO) to heads, then dQ, dK, dV (dtQ, dtK, dtV) back to the sequence
        sent = seq_to_heads_in(Hq, Dv) + heads_to_seq_out(Hq, D) + heads_to_seq_out(Hkv, D + Dv)
    return sent * t * e


def _rank_main(rank, world, store, out, cfg):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import flowmap_kernels.distributed as fkd

        dtype = DTYPES[cfg["dtype"]]
        g = torch.Generator().manual_seed(rank)
        layout = fkd.SequenceLayout(cfg["seq"], world, cfg["load_balance"])
        Ll = layout.local_length(rank)
        B, Hq, Hkv, D, Dv = cfg["batch"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["v_head_dim"]
        mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
        q, k, v = mk(B, Hq, Ll, D), mk(B, Hkv, Ll, D), mk(B, Hkv, Ll, Dv)
        tq, tk, tv = mk(B, Hq, Ll, D), mk(B, Hkv, Ll, D), mk(B, Hkv, Ll, Dv)
        do, dto = torch.randn(B, Hq, Ll, Dv, generator=g).to(dtype), torch.randn(B, Hq, Ll, Dv, generator=g).to(dtype)
        rows = []
        for mode in MODES:
            if mode == "ulysses" and (Hq % world or Hkv % world):
                continue
            kw = dict(is_causal=cfg["causal"], enable_gqa=Hq != Hkv, mode=mode, load_balance=cfg["load_balance"])
            measured = {}
            dist.barrier()
            t0 = time.perf_counter()
            with fkd.count_communication() as c:
                o, to = fkd.context_parallel_attention_jvp(q, k, v, tq, tk, tv, **kw)
            measured["forward+jvp"] = (dict(c.bytes_sent), time.perf_counter() - t0)
            t0 = time.perf_counter()
            with fkd.count_communication() as c:
                torch.autograd.backward([o, to], [do, dto])
            measured["backward_through_jvp"] = (dict(c.bytes_sent), time.perf_counter() - t0)
            t0 = time.perf_counter()
            with fkd.count_communication() as c:
                o = fkd.context_parallel_attention(q, k, v, **kw)
            measured["forward"] = (dict(c.bytes_sent), time.perf_counter() - t0)
            t0 = time.perf_counter()
            with fkd.count_communication() as c:
                o.backward(do)
            measured["backward"] = (dict(c.bytes_sent), time.perf_counter() - t0)
            for phase in PHASES:
                by_kind, seconds = measured[phase]
                total = sum(n for kind, n in by_kind.items() if kind != "metadata")
                rows.append(dict(world=world, mode=mode, phase=phase, rank=rank, bytes_by_kind=by_kind,
                                 measured_bytes=total, formula_bytes=formula(mode, phase, rank, world, cfg),
                                 seconds=seconds))
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            torch.save([row for part in gathered for row in part], out)
        dist.barrier()  # no rank tears its gloo pairs down while a peer still reads from them
    finally:
        from flowmap_kernels.distributed.processes import leave_process_group
        leave_process_group(barrier=False)  # (the normal path passed its barrier above)


def measure(world: int, cfg: dict, timeout: float = 600.0) -> list[dict]:
    """One row per (mode, phase, rank) for a group of ``world`` processes; ranks still running after
    ``timeout`` seconds are killed and a TimeoutError is raised."""
    from flowmap_kernels.distributed.processes import join_within
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx = mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), out, cfg), nprocs=world, join=False)
        join_within(ctx, timeout, "cp_comm_volume")
        rows = torch.load(out, weights_only=False)
    for row in rows:
        row["match"] = row["measured_bytes"] == row["formula_bytes"]
    return rows


def config_from_args(args) -> dict:
    dtype = DTYPES[args.dtype]
    return dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq=args.seq, head_dim=args.head_dim,
                v_head_dim=args.v_head_dim or args.head_dim, dtype=args.dtype,
                elem=torch.empty((), dtype=dtype).element_size(), acc=8 if dtype == torch.float64 else 4,
                causal=args.causal, load_balance=args.load_balance)


def table(rows: list[dict]) -> str:
    lines = [f"{'W':>2} {'mode':8} {'phase':21} {'rank':>4} {'measured bytes':>15} {'formula bytes':>15} "
             f"{'MiB':>9} {'match':>5} {'seconds':>8}"]
    for r in sorted(rows, key=lambda r: (r["world"], r["mode"], PHASES.index(r["phase"]), r["rank"])):
        lines.append(f"{r['world']:>2} {r['mode']:8} {r['phase']:21} {r['rank']:>4} {r['measured_bytes']:>15} "
                     f"{r['formula_bytes']:>15} {r['measured_bytes'] / 2**20:>9.3f} "
                     f"{'yes' if r['match'] else 'NO':>5} {r['seconds']:>8.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--v-head-dim", type=int, default=0, help="default: --head-dim")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--load-balance", action="store_true")
    p.add_argument("--out", default="bench_out/cp_comm_volume.json")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked: sizes positive, --heads a multiple of --kv-heads (default: --heads)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.kv_heads is None:
        args.kv_heads = args.heads
    require_ints(p, args, "batch", "heads", "kv_heads", "seq", "head_dim")
    if args.v_head_dim < 0:
        p.error(f"--v-head-dim: expected an integer >= 1 (or 0: --head-dim), got {args.v_head_dim}")
    if any(w < 1 for w in args.world):
        p.error(f"--world: expected process counts >= 1, got {' '.join(map(str, args.world))}")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def main(argv=None) -> dict:
    """Measure every --world, print the table, write --out; the result dict (``all_match``: every count
    equals its formula)."""
    args = parse_args(argv)
    require_output(build_parser(), args.out)  # a usage error before the processes start
    cfg = config_from_args(args)
    rows = []
    for world in args.world:
        rows += measure(world, cfg)
    print(table(rows))
    result = dict(config=cfg, worlds=args.world, all_match=all(r["match"] for r in rows), rows=rows,
                  torch=torch.__version__)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"all measured == formula: {result['all_match']}; wrote {args.out}")
    return result


def cli(argv=None) -> int:
    """Exit status of the script: 1 when a measured count differs from its formula."""
    result = main(argv)
    if result["all_match"]:
        return 0
    bad = sum(not r["match"] for r in result["rows"])
    print(f"error: {bad} of {len(result['rows'])} measured counts differ from the formula", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(cli())
