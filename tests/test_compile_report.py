"""Ahead-of-time compile report of the shipped Triton kernel configs (no GPU needed).

Compiles every kernel launch the Triton attention backend would make, for sm_90a (the target the
configs are tuned for) and sm_80, and checks: no register spills on sm_90a up to head dim 128 in
bf16/fp16/fp32; shared memory within the opt-in limit of each arch; wgmma (Hopper tensor cores) used by
every 16-bit key-loop kernel on sm_90a up to head dim 128. sm_80 and head dim 256 are reported only.
float32 is checked for the head dims it ships with on CUDA (configs.fp32_head_dim_supported).
Results are cached (~/.cache/flowmap_kernels/compile_report.json) so reruns take seconds.
"""
import json
import os
import subprocess
import sys

import pytest

from flowmap_kernels import compile_report as cr
from flowmap_kernels.triton_kernels.configs import fp32_head_dim_supported

SM90_BF16_DIMS = (16, 48, 64, 80, 128)   # every head-dim bucket <= 128 plus non-powers of two
SM90_FP16_DIMS = (64, 128)
SM90_FP32_DIMS = (16, 24, 32, 48, 64)  # the float32 head dims that ship on CUDA; others go to "torch"


@pytest.fixture(scope="module")
def records():
    cache = cr._default_cache()
    recs = cr.triton_records(["sm_90a"], SM90_BF16_DIMS, ["bf16"], cache=cache, workers=0)
    recs += cr.triton_records(["sm_90a"], SM90_FP16_DIMS, ["fp16"], cache=cache, workers=0)
    recs += cr.triton_records(["sm_90a"], SM90_FP32_DIMS, ["fp32"], cache=cache, workers=0)
    recs += cr.triton_records(["sm_80"], (64, 128, 256), ["bf16"], cache=cache, workers=0)
    recs += cr.triton_records(["sm_90a"], (256,), ["bf16"], cache=cache, workers=0)
    print("\n" + cr.format_table(recs))
    return recs


def test_every_family_is_reported(records):
    fams = {r["family"] for r in records}
    assert fams == {"forward", "backward", "jvp_forward", "jvp_backward"}
    for r in records:
        assert cr.family(r["kernel"]) in r["kernel"]
        assert set(r) >= {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "uses_wgmma"}
        assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0


def test_no_spills_on_sm90a_up_to_head_dim_128(records):
    shipped = [r for r in records if r["arch"] == "sm_90a" and r["head_dim"] <= 128
               and (r["dtype"] != "fp32" or fp32_head_dim_supported(r["head_dim"]))]
    assert {r["dtype"] for r in shipped} == {"bf16", "fp16", "fp32"}
    spilled = [(r["kernel"], r["dtype"], r["head_dim"], r["config"], r["spill_bytes"]) for r in shipped
               if r["spill_bytes"] > 0]
    assert not spilled, f"register spills on sm_90a: {spilled}"


def test_shared_memory_within_limits(records):
    over = [(r["kernel"], r["arch"], r["dtype"], r["head_dim"], r["shared_bytes"]) for r in records
            if r["shared_bytes"] > cr.SHARED_LIMIT[r["arch"]]]
    assert not over, f"shared memory over the opt-in limit: {over}"


def test_wgmma_on_sm90a(records):
    heavy = [r for r in records if r["arch"] == "sm_90a" and r["dtype"] in ("bf16", "fp16")
             and r["head_dim"] <= 128 and not r["kernel"].endswith("_prep")]  # D=256 uses small tiles
    assert heavy
    missing = [(r["kernel"], r["head_dim"], r["config"]) for r in heavy if not r["uses_wgmma"]]
    assert not missing, f"no wgmma: {missing}"
    assert not any(r["uses_wgmma"] for r in records if r["arch"] == "sm_80")  # mma.sync there


def test_family_names():
    assert cr.family("jvp_backward_dkdv[dk]") == "jvp_backward"
    assert cr.family("backward_dq") == "backward"
    assert cr.family("jvp_forward") == "jvp_forward"
    with pytest.raises(ValueError, match="kernel"):
        cr.family("softmax")


def test_record_sources_are_pluggable(monkeypatch):
    fake = dict(kernel="ln_jvp_forward", config="x", arch="sm_80", registers=1, spill_bytes=0, shared_bytes=0,
                uses_wgmma=False)
    recs = cr.collect(["sm_80"], sources=[lambda archs, **_: [dict(fake)]])
    assert recs == [fake]


def test_cli_json(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "flowmap_kernels.compile_report", "--arch", "sm_90a", "--head-dims",
                          "64", "--dtypes", "bf16", "--kernels", "forward", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = json.loads(out.read_text())
    assert [r["kernel"] for r in recs if r["source"] == "triton"] == ["forward"]
    assert "forward" in res.stdout and "wgmma" in res.stdout
