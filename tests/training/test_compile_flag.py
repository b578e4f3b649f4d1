"""The training loop's --compile flag: the whole step (flowmap_kernels.compiled_step) compiled, the same
losses and weights as the eager loop, compile time reported apart; the flag's errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.training import loop
from tests.numerics import rel_err

TINY = ["--width", "16", "--depth", "1", "--batch", "32", "--no-progress", "--threads", "1", "--no-eval"]


def _cfg(out, *extra):
    return train.resolve_config(train.build_parser().parse_args(["--out", str(out), *TINY, *extra]))


@pytest.mark.parametrize("method", ["tvm", "scm"])
def test_compiled_loop_equals_eager_loop(tmp_path, method):
    """TVM (EMA teacher inside the compiled step), sCM (learned loss weight, ``step`` passed per call);
    backend aot_eager (set through cfg.extra, as tests do) keeps the compile short."""
    flags = ["--method", method, "--steps", "4", "--ckpt-every", "100"]
    eager = loop.run(_cfg(tmp_path / "eager", *flags))
    torch._dynamo.reset()
    cfg = dataclasses.replace(_cfg(tmp_path / "compiled", *flags, "--compile", "default"),
                              extra={"compile_backend": "aot_eager"})
    compiled = loop.run(cfg)
    torch._dynamo.reset()
    assert eager["compile"] == "none" and compiled["compile"] == "default"
    assert compiled["compile_s"] > 0 and compiled["sec_per_step_after_compile"] >= 0
    ck_e = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)
    ck_c = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    assert ck_c["step"] == 4 and len(ck_c["losses"]) == 4
    for a, b in zip(ck_c["losses"], ck_e["losses"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    for k, v in ck_e["model"].items():
        assert rel_err(ck_c["model"][k], v) < 1e-3, k
    assert ck_c["args"]["compile"] == "default"


def test_compile_flag_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="--compile"):
        _cfg(tmp_path, "--compile", "default", "--dp-shard", "1")
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--compile", "max-autotune"])
    assert _cfg(tmp_path).compile == "none"
