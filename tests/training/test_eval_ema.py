"""The training loop's second EMA (--eval-ema-decay; TVM's teacher / evaluation EMA pair, arXiv:2511.19797)
and iMF's auxiliary velocity head as the loop builds it: defaults, updates with their own decays, which
EMA is the teacher and which is evaluated, and checkpoint round trips that restore both EMAs."""
from __future__ import annotations

import types

import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.training.config import resolve_config
from flowmap_kernels.training.loop import _unsharded_copies, build_network, setup, train_step
from flowmap_kernels.training.loop import train as train_loop

TINY = ["--width", "16", "--depth", "1", "--batch", "16", "--no-progress", "--threads", "1", "--no-eval"]


def _cfg(tmp, *extra):
    return resolve_config(train.build_parser().parse_args(["--out", str(tmp), *TINY, *extra]))


def _run(tmp, *extra):
    return train.main(["--out", str(tmp), *TINY, *extra])


def test_defaults_resolve_per_method_preset_and_flags(tmp_path):
    """TVM keeps the paper's pair (teacher 0.99, evaluation 0.9999) off the 2D preset; the 2D preset and
    the other methods keep one 0.995 EMA; explicit flags win; a self teacher keeps the plain decay."""
    c = _cfg(tmp_path, "--method", "tvm")
    assert (c.ema_decay, c.eval_ema_decay) == (0.995, 0.0)
    for extra in (["--no-preset"], ["--data", "digits", "--model", "mlp"]):
        c = _cfg(tmp_path, "--method", "tvm", *extra)
        assert (c.ema_decay, c.eval_ema_decay) == (0.99, 0.9999), extra
    assert (_cfg(tmp_path, "--method", "meanflow", "--no-preset").eval_ema_decay, ) == (0.0,)
    c = _cfg(tmp_path, "--method", "tvm", "--eval-ema-decay", "0.9", "--ema-decay", "0.95")
    assert (c.ema_decay, c.eval_ema_decay) == (0.95, 0.9)
    c = _cfg(tmp_path, "--method", "tvm", "--no-preset", "--eval-ema-decay", "0")
    assert (c.ema_decay, c.eval_ema_decay) == (0.995, 0.0)
    c = _cfg(tmp_path, "--method", "tvm", "--no-preset", "--teacher", "self")
    assert (c.ema_decay, c.eval_ema_decay) == (0.995, 0.9999)
    with pytest.raises(ValueError, match="--eval-ema-decay"):
        _cfg(tmp_path, "--method", "tvm", "--eval-ema-decay", "1.0")
    with pytest.raises(ValueError, match="--ema-decay"):
        _cfg(tmp_path, "--method", "tvm", "--ema-decay", "-0.1")


def test_two_emas_update_with_their_own_decays_teacher_and_evaluation(tmp_path):
    """Every step updates both EMAs from the new weights, each with its own decay and warm-up
    min(decay, (1 + n) / (10 + n)); the loss's teacher is the first, evaluation samples the second."""
    st = setup(_cfg(tmp_path, "--method", "tvm", "--steps", "5", "--ema-decay", "0.8", "--eval-ema-decay", "0.3"))
    assert st.eval_ema is not None and st.ema.decay == 0.8 and st.eval_ema.decay == 0.3
    real, seen = st.method, []

    def loss(model, x0, *, cond=None, **cfg):
        seen.append(cfg.get("teacher"))
        return real.loss(model, x0, cond=cond, **cfg)
    st.method = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if k.isupper()}, loss=loss)
    want = {k: [p.detach().clone() for p in e.module.parameters()] for k, e in st.emas}
    for n in range(5):
        assert train_step(st, st.ema.module) == st.losses[-1]
        for k, decay in (("ema", 0.8), ("eval_ema", 0.3)):
            d = min(decay, (1 + n) / (10 + n))
            for w, p in zip(want[k], st.model.parameters()):
                w.lerp_(p.detach(), 1.0 - d)
    for k, e in st.emas:
        assert e.num_updates == 5
        assert all(torch.equal(a, b) for a, b in zip(want[k], e.module.parameters())), k
    assert not all(torch.equal(a, b) for a, b in zip(st.ema.module.parameters(), st.eval_ema.module.parameters()))
    # train() passes the first EMA as the teacher; evaluation takes the second
    st2 = setup(_cfg(tmp_path / "b", "--method", "tvm", "--steps", "2", "--eval-ema-decay", "0.3"))
    st2.method = st.method
    seen.clear()
    train_loop(st2)
    assert len(seen) == 2 and all(t is st2.ema.module for t in seen)
    assert _unsharded_copies(st2)[1] is st2.eval_ema.module and st2.sampling_ema is st2.eval_ema


def test_without_eval_ema_the_one_ema_is_teacher_and_evaluated(tmp_path):
    st = setup(_cfg(tmp_path, "--method", "tvm", "--steps", "2"))
    assert st.eval_ema is None and [k for k, _ in st.emas] == ["ema"]
    assert st.sampling_ema is st.ema and _unsharded_copies(st)[1] is st.ema.module


def _ck(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_checkpoint_round_trip_restores_both_emas(tmp_path, capsys):
    """6 steps in one go == 3 steps, then --resume to 6: losses, model and both EMAs (weights, counters,
    decays) bit for bit. A checkpoint without an evaluation EMA does not resume into a run that wants one."""
    # decays below the warm-up (1 + n) / (10 + n), so that the two EMAs differ within 6 steps
    common = ["--method", "tvm", "--steps", "6", "--ckpt-every", "2", "--ema-decay", "0.3",
              "--eval-ema-decay", "0.15", "--lr-schedule", "constant"]
    assert _run(tmp_path / "full", *common) == 0
    assert _run(tmp_path / "part", *common, "--stop-after", "3") == 0
    part = _ck(tmp_path / "part")
    assert part["step"] == 3 and part["eval_ema"]["num_updates"] == 3 and part["eval_ema"]["decay"] == 0.15
    assert _run(tmp_path / "part", *common, "--resume") == 0
    a, b = _ck(tmp_path / "full"), _ck(tmp_path / "part")
    assert a["losses"] == b["losses"] and len(a["losses"]) == 6
    for key in ("ema", "eval_ema"):
        assert a[key]["num_updates"] == b[key]["num_updates"] == 6 and a[key]["decay"] == b[key]["decay"]
        assert all(torch.equal(a[key]["module"][k], b[key]["module"][k]) for k in a[key]["module"]), key
    assert not all(torch.equal(a["ema"]["module"][k], a["eval_ema"]["module"][k]) for k in a["ema"]["module"])
    # one EMA: no eval_ema entry (the checkpoint is what it was); resuming it with --eval-ema-decay is refused
    one = ["--method", "tvm", "--steps", "4", "--lr-schedule", "constant"]
    assert _run(tmp_path / "one", *one, "--stop-after", "2") == 0
    assert "eval_ema" not in _ck(tmp_path / "one")
    capsys.readouterr()
    assert _run(tmp_path / "one", *one, "--resume", "--eval-ema-decay", "0.5") == 2
    assert "--eval-ema-decay" in capsys.readouterr().err


def test_imf_aux_head_is_built_trained_and_model_defining(tmp_path, capsys):
    cfg = _cfg(tmp_path, "--method", "imf", "--cfg", "aux_head=true")
    from flowmap_kernels.data import get_dataset
    from flowmap_kernels.methods import get_method
    net = build_network(cfg, get_dataset(cfg.data), get_method("imf"))
    assert net.aux_velocity and net.aux_out is not None
    plain = build_network(_cfg(tmp_path, "--method", "imf"), get_dataset(cfg.data), get_method("imf"))
    assert plain.aux_out is None
    args = ["--method", "imf", "--steps", "4", "--cfg", "aux_head=true"]
    assert _run(tmp_path / "aux", *args, "--stop-after", "2") == 0
    ck = _ck(tmp_path / "aux")
    assert "aux_out.weight" in ck["model"] and ck["model"]["aux_out.weight"].abs().sum() > 0  # the head trained
    capsys.readouterr()
    assert _run(tmp_path / "aux", "--method", "imf", "--steps", "4", "--resume") == 2
    assert "aux_head" in capsys.readouterr().err
    assert _run(tmp_path / "aux", *args, "--resume") == 0
