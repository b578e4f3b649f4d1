"""Context-parallel attention (ring and Ulysses) on 2 and 4 gloo processes against the float64 reference.

One spawned job per world size runs every case (process start-up dominates on a small machine): O, tO
and the six gradients of a loss on both outputs, under torch.func.jvp, forward_ad and the explicit _jvp
function, plus the primal path (O and dQ, dK, dV; it must run the primal kernels only); every dtype
within tests.numerics.TOLERANCE (float64 1e-11 relative). Shard / gather round trips, two
sub-groups side by side, torch.func.grad over torch.func.jvp, the ring Function's own forward-mode rule,
learned float masks' gradients, nested jvp, the DiT switch (with and without activation checkpointing),
empty sequences and argument errors (including calls that differ between ranks) run in the same jobs.
"""
from __future__ import annotations

import pytest
import torch

import flowmap_kernels.distributed as fkd
from tests.distributed.harness import spawn
from tests.distributed.workers import (CPCase, attention_cases, autocast_check, dit_checks, empty_sequence_checks,
                                      error_checks, forward_over_forward_check, functional_grad_check, mask_grad_cases,
                                      ring_jvp_rule_check, shard_gather_checks, subgroup_cases)
from tests.numerics import TOLERANCE

TOL = TOLERANCE[torch.float64]  # 1e-11 relative (norm ratio)

CASES = [
    CPCase.of(name="causal", causal=True, q_len=13, kv_len=13),
    CPCase.of(name="causal_load_balance", causal=True, load_balance=True, q_len=21, kv_len=21),
    CPCase.of(name="bool_mask", mask="bool", q_len=11, kv_len=14),
    CPCase.of(name="bool_mask_dead_rows_broadcast_heads", mask="bool_rows", load_balance=True, q_len=12, kv_len=12),
    CPCase.of(name="float_mask", mask="float", q_len=10, kv_len=10, head_dim=4),
    CPCase.of(name="keys_only_mask", mask="keys_only", batch=1, q_len=9, kv_len=15),
    CPCase.of(name="gqa_causal", q_heads=8, kv_heads=4, causal=True, q_len=14, kv_len=14, head_dim=4),
    CPCase.of(name="cross_attention_lq_lt_lk", batch=1, q_len=10, kv_len=17),
    CPCase.of(name="causal_lq_gt_lk_load_balance", batch=1, causal=True, load_balance=True, q_len=19, kv_len=10),
    CPCase.of(name="gqa_ring_only", batch=1, q_heads=6, kv_heads=3, causal=True, q_len=7, kv_len=7, head_dim=4),
    CPCase.of(name="fewer_tokens_than_ranks", batch=1, causal=True, q_len=3, kv_len=3, head_dim=4),
    # per-row masks where a rank holds one query row (its one mask row could also read as a broadcast one)
    CPCase.of(name="one_query_row_bool_mask", mask="bool", batch=1, q_len=3, kv_len=7, head_dim=4),
    CPCase.of(name="one_query_row_float_mask", mask="float", batch=1, q_len=3, kv_len=5, head_dim=4),
    CPCase.of(name="float32_causal_load_balance", causal=True, load_balance=True, q_len=18, kv_len=18,
              dtype=torch.float32),
    CPCase.of(name="bfloat16_bool_mask", mask="bool", q_len=16, kv_len=16, dtype=torch.bfloat16),
]
BY_NAME = {c.name: c for c in CASES}
# float masks that require grad (learned biases): per row and head, shared by the heads, broadcast over rows
MASK_GRAD_CASES = [
    CPCase.of(name="float_mask_grad", mask="float", q_len=10, kv_len=12, head_dim=4),
    CPCase.of(name="float_rows_mask_grad_load_balance", mask="float_rows", load_balance=True, q_len=13, kv_len=13),
    CPCase.of(name="key_bias_grad_gqa", mask="float_keys", q_heads=4, kv_heads=2, batch=1, q_len=9, kv_len=15),
    CPCase.of(name="head_key_bias_grad", mask="float_head_keys", batch=1, q_len=11, kv_len=7),
    CPCase.of(name="one_query_row_mask_grad", mask="float_rows", batch=1, q_len=3, kv_len=6, head_dim=4),
]


def _check_attention(results, world, cases=CASES):
    assert results, "no case ran"
    bad = {}
    for (name, mode), errors in results.items():
        assert errors["_primal_used_jvp_kernels"] == 0, (name, mode)
        if mode == "ring":
            assert errors["_primal_forward_calls"] >= 1, (name, mode)
        tol = TOLERANCE[BY_NAME[name].dtype]
        worst = {k: v for k, v in errors.items() if not k.startswith("_") and not v < tol}
        if worst:
            bad[(name, mode)] = worst
    assert not bad, bad
    modes = {(name, mode) for name, mode in results}
    expected = {(c.name, "ring") for c in cases}
    expected |= {(c.name, "ulysses") for c in cases if c.q_heads % world == 0 and c.kv_heads % world == 0}
    assert modes == expected


def _check_mask_grad(results, world):
    expected = {(c.name, m) for c in MASK_GRAD_CASES for m in ("ring", "ulysses")
                if m == "ring" or (c.q_heads % world == 0 and c.kv_heads % world == 0)}
    assert set(results) == expected
    bad = {key: {k: v for k, v in errs.items() if not v < TOL} for key, errs in results.items()}
    assert not any(bad.values()), bad
    assert all({"dmask/func.jvp", "dmask/explicit", "dmask/primal"} <= set(errs) for errs in results.values())


def _world2_job(rank, world):
    return dict(attention=attention_cases(rank, world, CASES), shard=shard_gather_checks(rank, world),
                mask_grad=mask_grad_cases(rank, world, MASK_GRAD_CASES),
                errors=error_checks(rank, world), jvp_rule=ring_jvp_rule_check(rank, world),
                func_grad=functional_grad_check(rank, world), autocast=autocast_check(rank, world),
                forward_over_forward=forward_over_forward_check(rank, world),
                dit=dit_checks(rank, world, DIT_CONFIGS), empty=empty_sequence_checks(rank, world))


SUBGROUP_CASES = [BY_NAME["causal_load_balance"], BY_NAME["gqa_causal"]]
DIT_CONFIGS = [("ring", False, False), ("ring", True, False), ("ulysses", False, False), ("ulysses", True, False),
               ("ring", True, "blocks"), ("ulysses", False, "selective")]


def _world4_job(rank, world):
    return dict(attention=attention_cases(rank, world, CASES), shard=shard_gather_checks(rank, world),
                mask_grad=mask_grad_cases(rank, world, MASK_GRAD_CASES),
                subgroups=subgroup_cases(rank, world, SUBGROUP_CASES), autocast=autocast_check(rank, world),
                forward_over_forward=forward_over_forward_check(rank, world), empty=empty_sequence_checks(rank, world))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawn(_world2_job, 2, tmp_path_factory.mktemp("cp2"))


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return spawn(_world4_job, 4, tmp_path_factory.mktemp("cp4"))


def test_attention_two_ranks(world2):
    _check_attention(world2["attention"], 2)


def test_attention_four_ranks(world4):
    _check_attention(world4["attention"], 4)


def test_attention_on_two_subgroups_of_four_ranks(world4):
    """Each of two 2-rank groups (dist.new_group) runs its own ring / Ulysses side by side."""
    _check_attention(world4["subgroups"], 2, SUBGROUP_CASES)


@pytest.mark.parametrize("world", [2, 4])
def test_mask_gradient(world, world2, world4):
    """A float mask that requires grad: its gradient (and every other output and gradient) against the
    single-process float64 reference, ring and Ulysses, on the JVP and primal paths."""
    _check_mask_grad((world2 if world == 2 else world4)["mask_grad"], world)


@pytest.mark.parametrize("world", [2, 4])
def test_shard_and_gather(world, world2, world4):
    res = (world2 if world == 2 else world4)["shard"]
    assert res and all(v == 1.0 for v in res.values()), {k: v for k, v in res.items() if v != 1.0}


def test_bad_input_errors(world2):
    assert all(world2["errors"].values()), world2["errors"]


@pytest.mark.parametrize("world", [2, 4])
def test_empty_sequences(world, world2, world4):
    """Zero keys, zero queries or neither over the whole group: zeros as in the local attention, both modes;
    gather_sequence of an empty sequence."""
    res = (world2 if world == 2 else world4)["empty"]
    assert len(res) == 7 and all(v == 1.0 for v in res.values()), res


def test_ring_function_forward_mode_rule(world2):
    errs = world2["jvp_rule"]
    assert set(errs) == {"o", "to", "dq", "dk", "dv", "dtq", "dtk", "dtv"}
    assert max(errs.values()) < TOL, errs


def test_func_grad_over_func_jvp(world2):
    """Pure function transforms (torch.func.grad of a loss on torch.func.jvp), both modes."""
    errs = world2["func_grad"]
    assert set(errs) == {"ring", "ulysses"} and max(errs.values()) < TOL, errs


@pytest.mark.parametrize("world", [2, 4])
def test_forward_over_forward(world, world2, world4):
    """Nested torch.func.jvp and forward_ad over reverse (an HVP): Ulysses (its all-to-alls carry tangents, the
    local attention has its own rules) against the float64 reference; the ring refuses both naming mode='ulysses'
    (before, its HVP came back without a tangent)."""
    res = (world2 if world == 2 else world4)["forward_over_forward"]
    assert res["ring_error"] == 1.0 and res["ring_hvp_error"] == 1.0, res
    errors = {k: v for k, v in res.items() if not k.endswith("_error")}
    assert set(errors) == {"y", "ty", "dy", "dty", "hvp"} and max(errors.values()) < TOL, res


@pytest.mark.parametrize("world", [2, 4])
def test_autocast_casts_as_sdpa(world, world2, world4):
    """Mixed float32 / bfloat16 inputs under torch.autocast: equal to the hand-cast call, both modes, all ranks,
    and within the bfloat16 tolerance of the single-process float64 reference."""
    res = (world2 if world == 2 else world4)["autocast"]
    assert res["same"] == {"ring": 1.0, "ulysses": 1.0}, res
    assert set(res["error"]) == {"ring", "ulysses"} and max(res["error"].values()) < TOLERANCE[torch.bfloat16], res


def test_dit_context_parallel_matches_single_process(world2):
    res = world2["dit"]
    assert set(res) == set(DIT_CONFIGS)
    for key, errs in res.items():
        assert errs["switched_off"] == 1.0, key
        assert errs["v"] < TOL and errs["tv"] < TOL and errs["grads"] < TOL, (key, errs)


def test_no_process_group_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fkd.context_parallel_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fkd.shard_sequence(q)
