"""Static performance report (flowmap_kernels.compile_report): products per tile, tensor-core shapes, waits
in the key loop, async loads, and the per-pass summary with its first-order time model (an ESTIMATE).

The counting functions run on small handcrafted TTIR / PTX texts (each can fail on a wrong count), then on
the real compile of the shipped sm_90a launches for bf16 at D = 64 and 128 (cached, see
tests/compile_report/test_triton.py). The products per tile of each pass are recorded (printed), and only the
bounds that hold by construction are asserted: each pass executes at least its mathematical minimum
(docs/math.md section 1) and the forward passes reach it.
"""
import pytest

from flowmap_kernels import compile_report as cr

TTIR = """\
module {
  tt.func public @k(%arg0: !tt.ptr<bf16>) attributes {noinline = false} {
    %0 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
    %1:2 = scf.for %i = %c0 to %n step %c64 iter_args(%x = %0, %y = %0) -> (tensor<64x64xf32>, tensor<64x64xf32>) {
      %2 = tt.dot %a, %b, %x : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32> loc(#loc2)
      %3 = "tt.reduce"(%2) <{axis = 1 : i32}> ({
      ^bb0(%p: f32, %q: f32):
        %m = arith.maxnumf %p, %q : f32 loc(#loc3)
        tt.reduce.return %m : f32 loc(#loc3)
      }) : (tensor<64x64xf32>) -> tensor<64xf32> loc(#loc3)
      %4 = scf.if %cond -> (tensor<64x64xf32>) {
        %5 = tt.dot %a, %b, %y : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32> loc(#loc4)
        scf.yield %5 : tensor<64x64xf32> loc(#loc4)
      } else {
        scf.yield %y : tensor<64x64xf32> loc(#loc4)
      } loc(#loc4)
      %6 = tt.dot %a, %b, %4 : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32> loc(#loc5)
      scf.yield %2, %6 : tensor<64x64xf32>, tensor<64x64xf32> loc(#loc5)
    } loc(#loc6)
    %7 = scf.for %j = %c0 to %n step %c64 iter_args(%z = %0) -> (tensor<64x64xf32>)  : i32 {
      %8 = tt.dot %a, %b, %z : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32> loc(#loc7)
      scf.yield %8 : tensor<64x64xf32> loc(#loc7)
    } loc(#loc8)
    tt.return loc(#loc9)
  } loc(#loc)
} loc(#loc)
"""

NESTED_TTIR = """\
tt.func public @k() {
  %0 = scf.for %h = %c0 to %g step %c1 iter_args(%x = %c) -> (tensor<64x64xf32>)  : i32 {
    %1 = tt.dot %a, %b, %x : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
    %2 = scf.for %i = %c0 to %n step %c64 iter_args(%y = %1) -> (tensor<64x64xf32>)  : i32 {
      %3 = tt.dot %a, %b, %y : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
      %4 = tt.dot %a, %b, %3 : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
      %5 = tt.dot %a, %b, %4 : tensor<64x16xbf16> * tensor<16x64xbf16> -> tensor<64x64xf32>
      scf.yield %5 : tensor<64x64xf32>
    }
    scf.yield %2 : tensor<64x64xf32>
  }
  tt.return
}
"""

PTX_WGMMA = """\
.version 8.7
.target sm_90a
.address_size 64
$L__BB0_1:
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, %p1, 1, 1, 0, 1;
\twgmma.commit_group.sync.aligned;
\twgmma.wait_group.sync.aligned 0;
\twgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, %p1, 1, 1, 0, 1;
\twgmma.wait_group.sync.aligned 1;
\tcp.async.cg.shared.global [ %r1 + 0 ], [ %rd3 + 0 ], 0x10, %r2;
\t@%p2 bra \t$L__BB0_1;
\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, %p1, 1, 1, 0, 1;
\twgmma.wait_group.sync.aligned 0;
\tret;
"""

PTX_NESTED_MMA_SYNC = """\
.target sm_80
$L__BB0_1:
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
$L__BB0_2:
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
\t@%p1 bra \t$L__BB0_2;
\t@%p2 bra.uni \t$L__BB0_1;
\tret;
"""

PTX_TCGEN05_TMA = """\
.target sm_100a
\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
$L__BB0_3:
\ttcgen05.mma.cta_group::1.kind::f16 [%r5], %rd6, %rd7, %r8, %p1;
\ttcgen05.mma.cta_group::1.kind::f16 [%r5], %rd6, %rd7, %r8, %p1;
\t@%p3 bra \t$L__BB0_3;
"""


def test_ttir_products_counts_the_key_loop_body():
    # loop 1 holds 3 dots directly (one inside an scf.if); one dot before it and one in another loop
    assert cr.ttir_products(TTIR) == (3, 2)
    # nested loops: the inner loop's 3 dots are its own, not the outer loop's (which has 1)
    assert cr.ttir_products(NESTED_TTIR) == (3, 1)
    assert cr.ttir_products("tt.func @k() {\n  tt.return\n}\n") == (0, 0)


def test_ptx_wgmma_shapes_waits_and_loads():
    assert cr.mma_kind(PTX_WGMMA) == "wgmma"
    assert cr.mma_shapes(PTX_WGMMA) == {"m64n64k16": 2, "m64n16k16": 1}
    assert cr.ptx_loops(PTX_WGMMA) == [(3, 10)]  # label line to its back branch
    assert cr.mma_shapes(cr.ptx_main_loop(PTX_WGMMA)) == {"m64n64k16": 1, "m64n16k16": 1}
    assert cr.waits_per_iteration(PTX_WGMMA) == 1  # wait_group 1 and the wait after the loop do not count
    assert cr.async_loads(PTX_WGMMA) == "cp.async"


def test_ptx_mma_sync_innermost_loop():
    assert cr.mma_kind(PTX_NESTED_MMA_SYNC) == "mma.sync"
    assert cr.mma_shapes(PTX_NESTED_MMA_SYNC) == {"m16n8k16": 3}
    assert cr.mma_shapes(cr.ptx_main_loop(PTX_NESTED_MMA_SYNC)) == {"m16n8k16": 2}  # the inner loop
    assert cr.waits_per_iteration(PTX_NESTED_MMA_SYNC) is None  # no wgmma
    assert cr.async_loads(PTX_NESTED_MMA_SYNC) == "none"


def test_ptx_tcgen05_and_tma():
    assert cr.mma_kind(PTX_TCGEN05_TMA) == "tcgen05"
    assert cr.mma_shapes(PTX_TCGEN05_TMA) == {"tcgen05.cta_group::1.kind::f16": 2}
    assert cr.async_loads(PTX_TCGEN05_TMA) == "tma"
    assert cr.mma_kind("ret;") == "none" and cr.ptx_main_loop("ret;") is None
    assert cr.traps(PTX_TCGEN05_TMA) == 0
    assert cr.traps(".entry k()\n{\n$L__func_begin0:\n\ttrap;\n$L__func_end0:\n}\n") == 1
    assert cr.traps("\t@%p3 trap;\n\tret;\n// trap; in a comment\n") == 1


def _rec(kernel, products, shapes, waits, stages=2, warps=8, regs=128, shared=65536, spill=0, **kw):
    return dict(dict(kernel=kernel, arch="sm_90a", dtype="bf16", head_dim=64, source="triton", mma="wgmma",
                     products_per_tile=products, loop_mma_shapes=shapes, wgmma_shapes=shapes,
                     waits_per_iteration=waits, num_stages=stages, num_warps=warps, registers=regs,
                     shared_bytes=shared, spill_bytes=spill, shipped=True), **kw)


def test_launch_efficiency_factors():
    ref = cr.MODEL["sm_90a"]["triton_reference"]
    e = cr.launch_efficiency(_rec("forward", 2, {"m64n64k16": 16}, 1))
    assert e["efficiency"] == pytest.approx(ref) and e["width"] == 1.0
    # m64n16 only: a quarter of the throughput; one wait per product: half; one stage: 0.8
    e = cr.launch_efficiency(_rec("jvp_backward_dkdv", 12, {"m64n16k16": 48}, 12, stages=1))
    assert (e["width"], e["waits"], e["stages"]) == (0.25, 0.5, 0.8)
    assert e["efficiency"] == pytest.approx(ref * 0.25 * 0.5 * 0.8)
    # mixed widths: useful FLOPs over FLOP-time (n16 costs an n64 issue): (96*16 + 6*64) / (96*64 + 6*64)
    e = cr.launch_efficiency(_rec("jvp_backward_dq[dq]", 8, {"m64n16k16": 96, "m64n64k16": 6}, 4))
    assert e["width"] == pytest.approx((96 * 16 + 6 * 64) / (96 * 64 + 6 * 64))
    # one warpgroup per SM (4 warps, shared memory for one block), spills
    e = cr.launch_efficiency(_rec("forward", 2, {"m64n64k16": 16}, 1, warps=4, shared=200000, spill=8))
    assert (e["occupancy"], e["spills"], e["resident_warpgroups"]) == (0.75, 0.7, 1.0)
    # registers: 255 x 256 threads leaves one block of 8 warps = 2 warpgroups
    assert cr.launch_efficiency(_rec("forward", 2, {"m64n64k16": 16}, 1, regs=255))["occupancy"] == 1.0
    # not modelled: other targets, float32, no tensor-core loop
    assert cr.launch_efficiency(_rec("forward", 2, {"m16n8k16": 8}, None, arch="sm_80", mma="mma.sync")) is None
    assert cr.launch_efficiency(_rec("forward", 2, {"m64n64k16": 16}, 1, dtype="fp32")) is None
    assert cr.launch_efficiency(_rec("backward_prep", 0, {}, None)) is None


def test_summaries_sum_launches_and_predict_against_fa2():
    fa2 = cr.MODEL["sm_90a"]["fa2"]
    recs = [_rec("forward", 2, {"m64n64k16": 16}, 1),
            _rec("backward_prep", 0, {}, None, mma="none"),
            _rec("backward_atomic", 5, {"m64n64k16": 20}, 2),
            _rec("backward_dkdv", 4, {"m64n64k16": 16}, 2),
            _rec("backward_dq", 3, {"m64n16k16": 12}, 3),
            _rec("jvp_forward", 6, {"m64n64k16": 24}, 4, dtype="fp16")]
    rows = {(s["pass"], s["dtype"]): s for s in cr.summaries(recs)}
    assert set(rows) == {("forward", "bf16"), ("backward", "bf16"), ("backward_deterministic", "bf16"),
                         ("jvp_forward", "fp16")}
    f = rows[("forward", "bf16")]
    assert (f["products"], f["minimum_products"], f["complete"]) == (2, 2, True)
    ref = cr.MODEL["sm_90a"]["triton_reference"]
    assert f["predicted_ratio_fa2"] == pytest.approx((2 / ref) / (2 / fa2["forward"]), abs=1e-3)
    b = rows[("backward", "bf16")]  # the one-pass backward (dQ by atomics) with its row pre-pass
    assert (b["products"], b["minimum_products"]) == (5, 5)
    assert b["products_by_launch"] == {"backward_prep": 0, "backward_atomic": 5}
    assert b["predicted_ratio_fa2"] == pytest.approx((5 / ref) / (5 / fa2["backward"]), abs=1e-3)
    d = rows[("backward_deterministic", "bf16")]
    assert (d["products"], d["minimum_products"]) == (7, 5)
    assert d["products_by_launch"] == {"backward_dkdv": 4, "backward_dq": 3}
    t = 4 / ref + 3 / (ref * 0.25 * 0.5)
    assert d["predicted_ratio_fa2"] == pytest.approx(t / (5 / fa2["backward"]), abs=1e-3)
    j = rows[("jvp_forward", "fp16")]
    assert j["minimum_products"] == 6
    assert j["predicted_ratio_fa2"] == pytest.approx((6 / (ref * 0.75)) / (2 / fa2["forward"]), abs=1e-3)
    # a pass with a launch missing is partial and not predicted
    part = cr.summaries([_rec("backward_dkdv", 4, {"m64n64k16": 16}, 2)])[0]
    assert not part["complete"] and part["predicted_ratio_fa2"] is None
    assert cr.MINIMUM_PRODUCTS == {"forward": 2, "backward": 5, "backward_deterministic": 5, "jvp_forward": 6,
                                   "jvp_forward_tma": 6, "jvp_forward_tangent_fp32": 6, "jvp_backward": 15,
                                   "jvp_backward_deterministic": 15}
    assert cr.pass_of("jvp_forward[tma]") == "jvp_forward_tma"
    assert cr.pass_of("jvp_forward[tangent_fp32]") == "jvp_forward_tangent_fp32"
    assert cr.pass_of("jvp_backward_atomic[dk,dq_ds]") == "jvp_backward"
    assert cr.pass_of("jvp_backward_dq[dq]") == "jvp_backward_deterministic"
    assert "ESTIMATE" in cr.format_summary(cr.summaries(recs))


@pytest.fixture(scope="module")
def sm90_records():
    return cr.triton_records(["sm_90a"], (64, 128), ["bf16"], cache=cr._default_cache(), workers=0)


def test_real_compile_counts(sm90_records):
    by = {(r["kernel"], r["head_dim"]): r for r in sm90_records}
    for d in (64, 128):
        fwd = by[("forward", d)]
        assert fwd["products_per_tile"] == 2 and fwd["products_outside_loop"] == 0
        assert fwd["mma"] == "wgmma" and fwd["waits_per_iteration"] >= 1 and fwd["async_loads"]
        assert all(k.startswith("m64n") for k in fwd["wgmma_shapes"])
        assert by[("jvp_forward", d)]["products_per_tile"] == 6
        assert by[("backward_prep", d)]["products_per_tile"] == 0 and by[("backward_prep", d)]["mma"] == "none"
        for r in (by[("forward", d)], by[("backward_dq", d)]):
            assert (r["num_warps"], r["num_stages"]) == (int(r["config"].split("/w")[1].split("/")[0]),
                                                        int(r["config"].split("/s")[1].split("/")[0]))
    # the primal one-pass backward at the mathematical minimum, 5 products per tile; with tangents one launch
    # of 15 products at D = 64, spill-free; three at D = 128 (20 products: one launch spills from D = 80)
    assert by[("backward_atomic", 64)]["products_per_tile"] == by[("backward_atomic", 128)]["products_per_tile"] == 5
    tangent = {d: [r for (k, dd), r in by.items() if k.startswith("jvp_backward_atomic") and dd == d]
               for d in (64, 128)}
    assert [len(tangent[64]), sum(r["products_per_tile"] for r in tangent[64])] == [1, 15]
    assert [len(tangent[128]), sum(r["products_per_tile"] for r in tangent[128])] == [3, 20]
    assert all(r["spill_bytes"] == 0 for r in tangent[64] + tangent[128])
    # at D = 128 the split one-pass tangent launches run 32 query columns: no m64n16 wgmma
    for (k, d), r in by.items():
        if k.startswith("jvp_backward_atomic[") and d == 128:
            assert "m64n16k16" not in r["wgmma_shapes"] and r["block_m"] == 32, r
    # every one-pass launch pipelines its key loop (num_stages >= 2, asynchronous copies)
    for r in sm90_records:
        if r["kernel"].split("[")[0] in ("backward_atomic", "jvp_backward_atomic"):
            assert r["num_stages"] >= 2 and r["async_loads"], r
    assert all(r["shipped"] for r in sm90_records)


def test_real_compile_pass_summary(sm90_records):
    rows = cr.summaries(sm90_records)
    print("\n" + cr.format_summary(rows))
    assert {(s["pass"], s["head_dim"]) for s in rows} == {(p, d) for p in cr.PASSES for d in (64, 128)}
    for s in rows:
        assert s["complete"] and s["shipped"]
        assert s["products"] >= s["minimum_products"], s  # recorded, not a target: see the printed table
        assert s["predicted_ratio_fa2"] is not None and s["predicted_ratio_fa2"] > 0
        assert s["products"] == sum(s["products_by_launch"].values())
        if s["pass"] in ("forward", "jvp_forward", "jvp_forward_tma", "backward"):
            assert s["products"] == s["minimum_products"]
    # the forward+JVP at D = 128: 128 x 64 tiles with tensor descriptors (m64n64 score products); with
    # pointer loads or a float32 tO that tile spills, and they take 128 x 32 (m64n32); no m64n16, no spill
    for name, block_n, shape in (("jvp_forward[tma]", 64, "m64n64k16"), ("jvp_forward", 32, "m64n32k16"),
                                 ("jvp_forward[tangent_fp32]", 32, "m64n32k16")):
        (r,) = [r for r in sm90_records if r["kernel"] == name and r["head_dim"] == 128]
        assert (r["block_m"], r["block_n"], r["spill_bytes"]) == (128, block_n, 0), r
        assert shape in r["loop_mma_shapes"] and "m64n16k16" not in r["wgmma_shapes"], r
    # at D = 64 the P tV products accumulate apart (TV_ACC): every product after the tangent logits stays
    # asynchronous, 3 waits per key block for 6 products (4 at D = 128, where the extra accumulator spills)
    fwd = {(r["kernel"], r["head_dim"]): r for r in sm90_records if r["kernel"].startswith("jvp_forward")}
    assert fwd[("jvp_forward[tma]", 64)]["waits_per_iteration"] == fwd[("jvp_forward", 64)]["waits_per_iteration"] == 3
    assert fwd[("jvp_forward[tma]", 128)]["waits_per_iteration"] == 4


def test_cli_summary_and_json(tmp_path):
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "flowmap_kernels.compile_report", "--arch", "sm_90a", "--head-dims",
                          "64", "--dtypes", "bf16", "--kernels", "forward", "--triton-only", "--summary", "--json",
                          str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ESTIMATE" in res.stdout and "forward" in res.stdout
    recs = json.loads(out.read_text())
    (launch,) = [r for r in recs if r["source"] == "triton"]
    (summary,) = [r for r in recs if r["source"] == "summary"]
    assert launch["kernel"] == "forward" and launch["products_per_tile"] == 2 and launch["shipped"]
    assert (summary["pass"], summary["products"], summary["minimum_products"]) == ("forward", 2, 2)
    assert summary["predicted_ratio_fa2"] > 0


def test_is_shipped():
    from flowmap_kernels.attention.triton import configs
    cfg = configs.get_config("forward", 64, "bf16", "sm90")
    assert cr.is_shipped("forward", "bf16", 64, "sm_90a", cfg)
    assert cr.is_shipped("backward_prep", "bf16", 64, "sm_90a", configs.PREP_CONFIG)
    assert not cr.is_shipped("forward", "bf16", 64, "sm_90a", configs.Config(16, 16, 4, 1))  # an override
    # sm_100a borrows the sm90 tiles, sm_120 the sm80 ones, except where their own entries replace them
    assert cr.is_shipped("forward", "fp16", 128, "sm_100a", configs.get_config("forward", 128, 2, "sm90"))
    assert cr.is_shipped("forward", "fp16", 16, "sm_120", configs.get_config("forward", 16, 2, "sm80"))
    for kernel in ("jvp_forward", "forward"):  # own entries (configs.FAMILY_TABLE): the borrowed tiles spill
        arch = "sm_100a" if kernel == "jvp_forward" else "sm_120"
        borrowed = configs.get_config(kernel, 128, 2, "sm90" if arch == "sm_100a" else "sm80")
        assert not cr.is_shipped(kernel, "fp16", 128, arch, borrowed)
        assert cr.is_shipped(kernel, "fp16", 128, arch, configs.get_config(kernel, 128, 2, arch))
    # float32 at D = 128 is routed to the "torch" backend (configs.fp32_head_dim_supported)
    assert not cr.is_shipped("forward", "fp32", 128, "sm_90a", configs.get_config("forward", 128, 4, "sm90"))
    assert cr.is_shipped("forward", "fp32", 64, "sm_90a", configs.get_config("forward", 64, 4, "sm90"))
    # float32 at D = 40 runs padded to 64 on sm90, and is routed to "torch" on the families that mask columns
    assert cr.is_shipped("forward", "fp32", 40, "sm_90a", configs.get_config("forward", 64, 4, "sm90"))
    assert not cr.is_shipped("forward", "fp32", 40, "sm_86", configs.get_config("forward", 40, 4, "sm86"))


def test_one_pass_tangent_backward_runs_32_query_columns_up_to_head_dim_64():
    """Up to D = 64 the one-launch tangent backward (15 products) fits 32 query columns in registers: at D = 64
    with 8 warps on 128 keys, its query-side tiles loaded and its dQ, dtQ added through tensor descriptors (no
    pointer or mask tensors in registers). Score-type products m64n32 wgmma (m64n16 only where the head dim
    itself is 16: the output products), no spill. Masked problems keep two launches at D = 64 (12 + 6
    products, the "_masked" launch variant): one spills there."""
    recs = cr.triton_records(["sm_90a"], (16, 32, 64), ["bf16"], kernels=["jvp_backward_atomic"],
                             cache=cr._default_cache(), workers=0)
    by = {}
    for r in recs:
        by.setdefault(r["head_dim"], []).append(r)
    assert all(r["block_m"] == 32 and r["spill_bytes"] == 0 and r["num_stages"] >= 2 for r in recs)
    assert [r["products_per_tile"] for r in by[16]] == [r["products_per_tile"] for r in by[32]] == [15]
    assert set(by[32][0]["loop_mma_shapes"]) == {"m64n32k16"}
    assert by[16][0]["loop_mma_shapes"]["m64n32k16"] > 0
    assert [(r["kernel"], r["products_per_tile"], r["config"]) for r in by[64]] == [
        ("jvp_backward_atomic", 15, "32x128/w8/s2")]
    assert set(by[64][0]["loop_mma_shapes"]) == {"m64n32k16", "m64n64k16"} and by[64][0]["async_load_kind"] == "tma"
    masked = cr.triton_records(["sm_90a"], (64,), ["bf16"], kernels=["jvp_backward_atomic"],
                               cache=cr._default_cache(), workers=0, variants=("bool_mask", "float_mask"))
    assert {(r["kernel"], r["products_per_tile"], r["spill_bytes"]) for r in masked} == {
        ("jvp_backward_atomic_masked[dk,dtk,dq,dtq]", 12, 0), ("jvp_backward_atomic_masked[dv,dtv]", 6, 0)}
