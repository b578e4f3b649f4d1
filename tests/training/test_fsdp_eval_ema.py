"""The evaluation EMA (--eval-ema-decay) under FSDP2: sharded like the model and the teacher EMA, written
into the sharded checkpoint (torch.distributed.checkpoint) and restored on --resume, also onto another
world size and into a plain single-process run."""
from __future__ import annotations

from pathlib import Path

import torch

from flowmap_kernels import train
from flowmap_kernels.training import close_distributed
from flowmap_kernels.training.checkpoint import latest_sharded, load_sharded, load_sharded_extras
from flowmap_kernels.training.config import resolve_config
from flowmap_kernels.training.loop import SHARDED_DIR, build_network
from tests.distributed.harness import spawn

# decays below the EMA warm-up (1 + n) / (10 + n), so that the two EMAs differ from the first steps
TINY = ["--width", "16", "--depth", "1", "--batch", "16", "--no-progress", "--threads", "1", "--no-eval",
        "--method", "tvm", "--lr-schedule", "constant", "--ema-decay", "0.3", "--eval-ema-decay", "0.15"]


def _argv(out, *extra):
    return ["--out", str(out), *TINY, *extra]


def _main(rank, world, argv):
    return train.main(argv)


def _sharding(rank, world, argv):
    """After setup: for model, EMA and evaluation EMA, whether every parameter is a DTensor and its local
    shard sizes; and the decays."""
    from torch.distributed.tensor import DTensor

    from flowmap_kernels.training.loop import setup
    st = setup(resolve_config(train.build_parser().parse_args(argv)))
    try:
        out = {}
        for name, m in (("model", st.model), ("ema", st.ema.module), ("eval_ema", st.eval_ema.module)):
            ps = list(m.parameters())
            out[name] = (all(isinstance(p, DTensor) for p in ps), [p.to_local().numel() for p in ps])
        return out, (st.ema.decay, st.eval_ema.decay)
    finally:
        close_distributed()


def _plain_state(out, argv):
    """The newest sharded checkpoint loaded into unsharded modules here: (tensors, extras)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    from flowmap_kernels.data import get_dataset
    from flowmap_kernels.methods import get_method
    cfg = resolve_config(train.build_parser().parse_args(argv))
    model, ema, eval_ema = (build_network(cfg, get_dataset(cfg.data), get_method(cfg.method)) for _ in range(3))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    msd, osd = get_state_dict(model, opt)
    tensors = {"model": msd, "optim": osd, "ema": get_model_state_dict(ema), "eval_ema": get_model_state_dict(eval_ema)}
    path = latest_sharded(Path(out) / SHARDED_DIR)
    load_sharded(path, tensors)
    return tensors, load_sharded_extras(path)


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_eval_ema_sharded_checkpoint_round_trip(tmp_path):
    """--dp-shard 2: both EMAs are sharded DTensors like the model; 6 steps in one go == 3 steps, then
    --resume to 6 (both EMAs' weights and counters); a plain single process resumes the sharded folder with
    both EMAs."""
    sh, decays = spawn(_sharding, 2, None, _argv(tmp_path / "probe", "--steps", "2", "--dp-shard", "2"),
                       timeout=300, group=False)
    assert decays == (0.3, 0.15)
    assert sh["model"][0] and sh["ema"][0] and sh["eval_ema"][0]
    assert sh["ema"][1] == sh["eval_ema"][1] == sh["model"][1]  # the same local shards as the model's
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--steps", "6", "--ckpt-every", "2", "--dp-shard", "2"]
    assert spawn(_main, 2, None, _argv(full, *common), timeout=300, group=False, all_ranks=True) == [0, 0]
    assert spawn(_main, 2, None, _argv(part, *common, "--stop-after", "3"), timeout=300, group=False,
                 all_ranks=True) == [0, 0]
    _, ex3 = _plain_state(part, _argv(part))
    assert ex3["step"] == 3 and ex3["eval_ema"] == {"num_updates": 3, "decay": 0.15}
    assert spawn(_main, 2, None, _argv(part, *common, "--resume"), timeout=300, group=False,
                 all_ranks=True) == [0, 0]
    (ta, ea), (tb, eb) = _plain_state(full, _argv(full)), _plain_state(part, _argv(part))
    assert ea["losses"] == eb["losses"] and len(ea["losses"]) == 6
    assert ea["ema"] == eb["ema"] and ea["eval_ema"] == eb["eval_ema"] == {"num_updates": 6, "decay": 0.15}
    for key in ("model", "ema", "eval_ema"):
        assert _same(ta[key], tb[key]), key
    assert not _same(ta["ema"], ta["eval_ema"])
    # 2 -> 1, plain single process: the sharded folder's two EMAs load into the unsharded loop
    from flowmap_kernels.training.loop import setup
    st = setup(resolve_config(train.build_parser().parse_args(_argv(part, "--steps", "6", "--resume"))))
    try:
        assert st.step == 6 and st.ema.num_updates == st.eval_ema.num_updates == 6
        assert _same(st.ema.module.state_dict(), ta["ema"]) and _same(st.eval_ema.module.state_dict(), ta["eval_ema"])
    finally:
        close_distributed()
