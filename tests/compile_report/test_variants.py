"""Compile report of the launches of masked, causal, packed and int64-offset problems (no GPU needed).

The tile tables are keyed by kernel, not by problem, so the tile a dense problem runs also runs causal, with
a boolean or an additive mask, on packed sequences (VARLEN) and with int64 row offsets (LARGE_OFFSETS); the
kernels compile that code in or out, which moves register counts by up to ~40. These tests compile every
such launch for sm_90a (wgmma) and sm_80 (mma.sync), bf16, D = 64 and 128, and hold what the dense report
holds: no shipped launch spills (but the few of KNOWN_SPILLS, each bounded), and each target's tensor-core
kind. Cached with the other records.
"""
import pytest

from flowmap_kernels import compile_report as cr
from flowmap_kernels.attention.triton import configs

VARIANTS = tuple(v for v in cr.VARIANTS if v != "dense")
ARCHS = ("sm_90a", "sm_80")
HEAD_DIMS = (64, 128)


@pytest.fixture(scope="module")
def records():
    recs = cr.triton_records(ARCHS, HEAD_DIMS, ["bf16"], cache=cr._default_cache(), workers=0, variants=VARIANTS)
    print("\n" + cr.format_table(recs))
    return recs


def test_every_variant_and_pass_is_compiled(records):
    assert {r["variant"] for r in records} == set(VARIANTS)
    for variant in VARIANTS:
        for arch in ARCHS:
            got = {cr.family(r["kernel"]) for r in records if r["variant"] == variant and r["arch"] == arch}
            assert got == {"forward", "backward", "jvp_forward", "jvp_backward"}, (variant, arch)
    # the launches differ from the dense ones where the kernels compile the problem's code in
    assert any(r["variant"] == "varlen" and r["kernel"] == "forward" for r in records)


# Spills that stay, each small, where every other tile tried spills in another problem or slows the dense one
# (the tables are shared): listed here, not hidden; any other spill fails the test.
KNOWN_SPILLS = {
    # int64 row offsets (slices over 2**31 elements), deterministic tangent dK/dV: 32x128/w8/s3, 32x64/w4/s2 and
    # 64x128/w8/s2 spill in other problems (16-904 B)
    ("jvp_backward_dkdv", "large_offsets", "sm_90a", 64): 40,
    # masks, deterministic primal dK/dV: 32x128/w8/s2 is spill-free but halves the dense launch's score products
    # to m64n32; 64x64/w4/s2 spills 8 / 40 B, 64x128/w8/s3 more
    ("backward_dkdv", "bool_mask", "sm_90a", 128): 16,
    ("backward_dkdv", "float_mask", "sm_90a", 128): 48,
    # a boolean mask in the forward: 8 B; 128x64/w8/s3 is spill-free (16 rows per warp), 128x64/w4/s2 is not
    ("forward", "bool_mask", "sm_80", 64): 8,
}


def test_no_spills_in_masked_causal_packed_or_int64_launches(records):
    shipped = [r for r in records if r["shipped"]]
    assert len(shipped) > 200
    spilled = {(r["kernel"], r["variant"], r["arch"], r["head_dim"]): r["spill_bytes"]
               for r in shipped if r["spill_bytes"] > 0}
    new = {k: v for k, v in spilled.items() if v > KNOWN_SPILLS.get(k, 0)}
    assert not new, f"register spills: {new}"
    print(f"\nknown spills (KNOWN_SPILLS): {spilled}")


def test_tensor_core_kind_and_tiles(records):
    for r in records:
        assert r["mma"] == configs.FAMILIES[configs.TARGETS[r["arch"]]].mma or r["kernel"].endswith("_prep"), r
        if not r["kernel"].endswith("_prep"):  # the dense problem's tile: the tables do not depend on the problem
            base = configs.table_key(r["kernel"])
            assert r["config"] == str(configs.get_config(base, r["head_dim"], r["dtype"],
                                                         configs.arch_family(r["arch"]))), r


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match="variant: expected one of"):
        cr.triton_launches(64, "bf16", ["forward"], variant="sliding_window")
