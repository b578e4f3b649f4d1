"""FPE benchmark (flowmap_kernels.bench.fpe): exact FLOP-FPE, term-by-term explanations, records, CLI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from flowmap_kernels.bench import RECORD_FIELDS, build_model, run_fpe
from flowmap_kernels.bench.counting import count_flops
from flowmap_kernels.bench.meta import metadata, nvml_info
from flowmap_kernels.bench.report import format_table, markdown_tables, write_csv, write_json, write_plot
from flowmap_kernels.methods import METHODS

from .helpers import build_allgrad

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The write-up's figures for a network that matches its cost model (no attention, every product's
# input differentiable): F 1, B 2, J 2, BJ 4.
EXPECTED_ALLGRAD = {("fm", "default", "full"): 3, ("meanflow", "default", "full"): 4,
                    ("imf", "default", "full"): 5, ("tvm", "default", "full"): 10, ("scm", "default", "full"): 4,
                    ("lsd", "default", "full"): 10, ("esd", "default", "full"): 12,
                    ("esd", "spatial_sg=False", "full"): 10, ("shortcut", "default", "full"): 8,
                    ("shortcut", "default", "recommended"): Fraction(13, 4), ("psd", "default", "full"): 8,
                    ("psd", "default", "recommended"): Fraction(7, 2)}


def _flops_only(**kw):
    return run_fpe(measure_time=False, measure_memory=False, **kw)


@pytest.mark.parametrize("backend", ["auto", "naive"])
def test_flop_fpe_is_the_write_up_model_on_a_matching_network(backend):
    """fm exactly 3.0; every method its nominal figure when the network has no attention and autograd
    skips no product (esd's default adds its no-grad spatial JVP: 12; the consistency sub-batch of
    a fraction f costs 3 + f: shortcut's 1/8 3.25, psd's 1/4 3.5)."""
    recs = _flops_only(backends=(backend,), build=lambda: build_allgrad(8))
    got = {(r["method"], r["variant"], r["batching"]): r for r in recs}
    assert set(got) == set(EXPECTED_ALLGRAD)
    for key, want in EXPECTED_ALLGRAD.items():
        r = got[key]
        assert r["error"] is None, r
        useful = r["iter_flops"] - r["iter_zero_flops"]
        fwd = r["fwd_flops"] - r["fwd_zero_flops"]
        assert Fraction(useful, fwd) == want, (key, r["flop_fpe"])
        assert r["explained_exactly"], key
    assert got[("fm", "default", "full")]["flop_fpe"] == 3.0
    for key in (("tvm", "default", "full"), ("lsd", "default", "full"), ("esd", "spatial_sg=False", "full")):
        assert got[key]["flop_fpe"] == got[key]["nominal_fpe"] == 10


def _skipped_input_grad_flops(model, x0, cond):
    """FLOPs of the dx products autograd skips in a forward+backward: linear layers whose input does
    not require grad (the patch embedding, the first layer of each timestep MLP)."""
    skipped = []

    def hook(mod, inp, out):
        x = inp[0]
        if not x.requires_grad:
            skipped.append(2 * (x.numel() // x.shape[-1]) * mod.weight.shape[1] * mod.weight.shape[0])
    hs = [m.register_forward_hook(hook) for m in model.modules()
          if getattr(m, "weight", None) is not None and m.weight.dim() == 2 and not isinstance(m, torch.nn.Embedding)]
    try:
        s = torch.rand(x0.shape[0])
        model(x0, s, s, y=cond).sum().backward()
    finally:
        for h in hs:
            h.remove()
        model.zero_grad(set_to_none=True)
    return sum(skipped)


def test_dit_every_method_explained_term_by_term_and_fm_departs_by_skipped_input_gradients():
    recs = _flops_only(model="dit-tiny", batch=4, backends=("auto", "naive"))
    assert len(recs) == 2 * 12  # 9 methods; esd, shortcut and psd measure two variants each
    for r in recs:
        assert r["error"] is None, r
        assert r["explained_exactly"], (r["backend"], r["method"], r["variant"], r["explanation"])
        assert r["resolved_backends"]["attention"] == ("naive" if r["backend"] == "naive" else "torch")
    model, x0, cond, _ = build_model("dit-tiny", batch=4)
    fwd = count_flops(lambda: model(x0, torch.rand(4), torch.rand(4), y=cond)).useful
    skipped = _skipped_input_grad_flops(model, x0, cond)
    assert skipped > 0
    for r in recs:
        if r["method"] == "fm":
            assert r["fwd_flops"] == fwd
            assert Fraction(r["iter_flops"] - r["iter_zero_flops"], fwd) == Fraction(3 * fwd - skipped, fwd)
    units = recs[0]["unit_fpe"]
    # attention's JVP is 3x its forward, linear's 2x: forward+JVP costs more than 2 forwards
    assert units["J:x1"] > 2.0 and units["JBJ:x1"] > 6.0


def test_records_fields_json_csv_plot(tmp_path):
    recs = run_fpe(model="dit-tiny", batch=4, backends=("auto",), methods=["fm", "shortcut"], repeats=1,
                   warmup=0)
    assert [(r["method"], r["batching"]) for r in recs] == [("fm", "full"), ("shortcut", "full"),
                                                            ("shortcut", "recommended")]
    for r in recs:
        for f in RECORD_FIELDS:
            assert f in r, f
        assert r["error"] is None
        assert r["time_fpe"] > 0 and r["peak_mem_bytes"] > 0 and r["fwd_peak_mem_bytes"] > 0
        assert r["nominal_fpe"] == METHODS[r["method"]].NOMINAL_FPE
        assert r["backend"] == "auto" and r["model"] == "dit-tiny" and r["device"] == "cpu"
        assert r["optimizer_step"] == "excluded" and r["ema_update"] == "excluded"
        m = r["meta"]
        assert m["torch"] == torch.__version__ and "triton" in m and m["device"] == "cpu"
        assert m["nvml"].startswith("skipped")
    assert recs[1]["iter_batch"] == 8 and recs[2]["iter_batch"] == 4
    write_json(recs, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert back[0]["method"] == "fm" and back[0]["flop_fpe"] == pytest.approx(recs[0]["flop_fpe"])
    write_csv(recs, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == 3 and float(rows[0]["flop_fpe"]) == pytest.approx(recs[0]["flop_fpe"])
    write_plot(recs, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown_tables(recs)
    assert "| shortcut | default | recommended |" in md and "| JBJ:t | 6 |" in md
    table = format_table(recs)
    assert "shortcut" in table and "recommended" in table and "auto FLOP" in table


def test_failing_method_gives_an_error_record_not_an_exception():
    def boom(model, x0, **kw):
        raise RuntimeError("kaboom")
    import types
    mod = types.SimpleNamespace(loss=boom, NOMINAL_FPE=1, CALLS="F")
    from flowmap_kernels.bench.fpe import Variant, measure_method
    model, x0, cond, _ = build_model("dit-tiny", batch=2)
    r = measure_method("boom", mod, Variant("default", "full"), model, x0, cond, device="cpu", backend="auto",
                       model_name="dit-tiny", measure_time=False, measure_memory=False)
    assert r["error"] == "RuntimeError: kaboom" and r["flop_fpe"] is None
    assert set(RECORD_FIELDS) <= set(r)
    assert "error" in format_table([dict(r, meta={"torch": "x", "triton": "y"}, model_info={})])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="methods"):
        run_fpe(model="dit-tiny", batch=2, methods=["nope"], measure_time=False, measure_memory=False)
    with pytest.raises(ValueError, match="model"):
        run_fpe(model="nope", batch=2, measure_time=False, measure_memory=False)
    with pytest.raises(ValueError, match="backend"):
        run_fpe(model="dit-tiny", batch=2, backends=("cuda-magic",), measure_time=False, measure_memory=False)
    with pytest.raises(ValueError, match="batch"):
        build_model("dit-tiny", batch=0)
    # a name given twice would be measured twice: duplicate JSON / CSV records behind one table row
    with pytest.raises(ValueError, match="methods: 'fm' given more than once"):
        run_fpe(model="dit-tiny", batch=2, methods=["fm", "fm"], measure_time=False, measure_memory=False)
    with pytest.raises(ValueError, match="backends: 'auto' given more than once"):
        run_fpe(model="dit-tiny", batch=2, backends=("auto", "auto"), measure_time=False, measure_memory=False)


def test_nvml_absent_is_reported_not_raised():
    info = nvml_info()
    assert isinstance(info, dict) and "nvml" in info
    if not torch.cuda.is_available():
        assert info["nvml"].startswith("unavailable")
    assert metadata("cpu")["nvml"].startswith("skipped")


def test_cli_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "flowmap_kernels.bench", "fpe", "--model", "dit-tiny", "--batch", "2",
           "--methods", "fm,meanflow", "--repeats", "1", "--warmup", "0", "--quiet",
           "--json", str(tmp_path / "o.json"), "--csv", str(tmp_path / "o.csv"), "--plot", str(tmp_path / "o.png")]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "meanflow" in p.stdout and "naive FLOP" in p.stdout
    recs = json.loads((tmp_path / "o.json").read_text())
    assert {(r["method"], r["backend"]) for r in recs} == {(m, b) for m in ("fm", "meanflow")
                                                           for b in ("auto", "naive")}
    assert all(r["explained_exactly"] for r in recs)
    assert (tmp_path / "o.csv").exists() and (tmp_path / "o.png").exists()


def test_cli_main_in_process(tmp_path, capsys):
    from flowmap_kernels.bench.__main__ import main
    with pytest.raises(SystemExit) as e:  # a usage error, before anything runs
        main(["fpe", "--model", "dit-tiny", "--methods", "nope", "--no-time"])
    assert e.value.code == 2 and "--methods: unknown method 'nope'" in capsys.readouterr().err
    assert main(["fpe", "--model", "mlp", "--batch", "4", "--methods", "fm,tvm", "--backends", "auto",
                 "--no-time", "--no-memory", "--quiet", "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "tvm" in out and "auto FLOP" in out
    recs = json.loads((tmp_path / "m.json").read_text())
    assert [r["method"] for r in recs] == ["fm", "tvm"] and all(r["explained_exactly"] for r in recs)
    with pytest.raises(SystemExit):
        main(["fpe", "--model", "no-such-model"])
