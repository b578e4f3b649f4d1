"""benchmarks/cp_comm_volume.py: the bytes counted in the communication wrappers equal the formulas of
docs/scaling.md (one spawned job: 3 ranks, unequal load-balanced shards, GQA, Dv != D), and the
formulas reduce to the closed forms stated there when W divides the sequence."""
from __future__ import annotations

import json
import os
import sys

import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCH_DIR)  # spawned ranks inherit sys.path and import the module by name

import cp_comm_volume as bench  # noqa: E402


def test_measured_bytes_equal_formula(tmp_path):
    out = tmp_path / "cp.json"
    res = bench.main(["--world", "3", "--seq", "10", "--heads", "6", "--kv-heads", "3", "--head-dim", "4",
                      "--v-head-dim", "6", "--dtype", "float64", "--causal", "--load-balance", "--out", str(out)])
    rows = res["rows"]
    assert len(rows) == 2 * 4 * 3  # modes x phases x ranks
    assert all(r["measured_bytes"] > 0 for r in rows)
    bad = [r for r in rows if r["measured_bytes"] != r["formula_bytes"]]
    assert not bad, bad
    assert res["all_match"] and json.loads(out.read_text())["all_match"]
    # unequal shards (10 tokens over 6 chunks): the ranks do not all send the same
    ring_fwd = {r["rank"]: r["measured_bytes"] for r in rows if r["mode"] == "ring" and r["phase"] == "forward"}
    assert len(set(ring_fwd.values())) > 1


@pytest.mark.parametrize("world", [2, 4, 8])
def test_formula_closed_forms(world):
    B, Hq, Hkv, L, D, Dv, e = 2, 8, 8, 64 * world, 16, 24, 2
    cfg = dict(batch=B, heads=Hq, kv_heads=Hkv, seq=L, head_dim=D, v_head_dim=Dv, elem=e, acc=4,
               load_balance=False)
    n = L // world
    kv_shard = B * Hkv * n * (D + Dv) * e  # K and V of one shard
    local_in = B * n * (Hq * D + Hkv * (D + Dv)) * e  # q, k, v of one shard
    local_out = B * Hq * n * Dv * e
    for r in range(world):
        assert bench.formula("ring", "forward+jvp", r, world, cfg) == (world - 1) * 2 * kv_shard
        assert bench.formula("ring", "forward", r, world, cfg) == (world - 1) * kv_shard
        assert bench.formula("ring", "backward_through_jvp", r, world, cfg) == \
            (world - 1) * 2 * kv_shard + world * 2 * kv_shard * 4 // e
        assert bench.formula("ulysses", "forward+jvp", r, world, cfg) * world == \
            2 * (world - 1) * (local_in + local_out)
        assert bench.formula("ulysses", "backward_through_jvp", r, world, cfg) * world == \
            2 * (world - 1) * (local_out + local_in)


def test_one_rank_sends_nothing(tmp_path):
    cfg = dict(batch=1, heads=2, kv_heads=2, seq=8, head_dim=4, v_head_dim=4, elem=4, acc=4, load_balance=False)
    assert {bench.formula(m, p, 0, 1, cfg) for m in bench.MODES for p in bench.PHASES} == {0}
    res = bench.main(["--world", "1", "--seq", "8", "--heads", "2", "--head-dim", "4", "--out",
                      str(tmp_path / "cp.json")])
    assert res["all_match"] and all(r["measured_bytes"] == 0 for r in res["rows"])


def test_cli_exits_nonzero_when_a_count_differs(tmp_path, monkeypatch, capsys):
    def fake_measure(world, cfg, timeout=600.0):
        return [dict(world=world, mode="ring", phase="forward", rank=0, bytes_by_kind={}, measured_bytes=8,
                     formula_bytes=16, seconds=0.0, match=False)]
    monkeypatch.setattr(bench, "measure", fake_measure)
    assert bench.cli(["--world", "2", "--out", str(tmp_path / "cp.json")]) == 1
    assert "1 of 1 measured counts differ" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--heads", "2", "--kv-heads", "8"], "--heads (2) must be a multiple of --kv-heads (8)"),
    (["--seq", "0"], "--seq: expected an integer >= 1, got 0"),
    (["--kv-heads", "0"], "--kv-heads: expected an integer >= 1, got 0"),
    (["--head-dim", "-1"], "--head-dim: expected an integer >= 1, got -1"),
    (["--v-head-dim", "-2"], "--v-head-dim: expected"),
    (["--world", "2", "0"], "--world: expected process counts >= 1, got 2 0"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_kv_heads_default_to_heads():
    args = bench.parse_args(["--heads", "2"])
    assert (args.heads, args.kv_heads) == (2, 2)
