"""The training loop under FSDP2 (--dp-shard): exact resume on the same world size, resharding resumes
(1 -> 2 and 2 -> 1 processes, and a plain single process loading a sharded checkpoint), atomic saves.

Multi-process runs are spawned gloo processes calling the loop in-process (cheaper than torchrun); a
single-process FSDP2 run (--dp-shard 1) uses a one-rank group."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from flowmap_kernels import train
from flowmap_kernels.distributed.processes import leave_process_group
from flowmap_kernels.training import close_distributed
from flowmap_kernels.training.checkpoint import latest_sharded, load_sharded, load_sharded_extras
from flowmap_kernels.training.config import resolve_config
from flowmap_kernels.training.loop import SHARDED_DIR, build_network
from tests.distributed.harness import spawn

TINY = ["--width", "16", "--depth", "1", "--batch", "16", "--no-progress", "--threads", "1", "--no-eval",
        "--method", "tvm", "--lr-schedule", "constant"]


def _argv(out, *extra):
    return ["--out", str(out), *TINY, *extra]


def _spawn(fn, world, *args):
    """Every rank's fn(rank, world, *args) on ``world`` processes that set up their own process group."""
    return spawn(fn, world, None, *args, timeout=300, group=False, all_ranks=True)


def _main(rank, world, argv):
    return train.main(argv)


def _plain_state(out, argv):
    """The newest sharded checkpoint in ``out`` loaded into unsharded modules in this process (no process
    group): ({"model", "optim", "ema"} FQN-keyed state dicts, extras)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    cfg = resolve_config(train.build_parser().parse_args(argv))
    from flowmap_kernels.data import get_dataset
    ds = get_dataset(cfg.data)
    from flowmap_kernels.methods import get_method
    model, ema = (build_network(cfg, ds, get_method(cfg.method)) for _ in range(2))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    msd, osd = get_state_dict(model, opt)
    tensors = {"model": msd, "optim": osd, "ema": get_model_state_dict(ema)}
    path = latest_sharded(Path(out) / SHARDED_DIR)
    load_sharded(path, tensors)
    return tensors, load_sharded_extras(path)


def _flat(tree, prefix=""):
    """{path: tensor or number} of a nested state dict (optimizer 'param_groups' lists included)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}/{i}").items()}
    return {prefix: tree}


def _assert_same(a, b, what):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb), what
    for k in fa:
        if torch.is_tensor(fa[k]):
            assert torch.equal(fa[k], fb[k]), (what, k)
        else:
            assert fa[k] == fb[k], (what, k, fa[k], fb[k])


def test_fsdp_two_ranks_resume_same_world_is_bit_for_bit(tmp_path):
    """--dp-shard 2: 6 steps in one go == 3 steps, then --resume to 6 (losses, model, Adam state, EMA)."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--steps", "6", "--ckpt-every", "2", "--dp-shard", "2"]
    assert _spawn(_main, 2, _argv(full, *common)) == [0, 0]
    assert _spawn(_main, 2, _argv(part, *common, "--stop-after", "3")) == [0, 0]
    assert load_sharded_extras(latest_sharded(part / SHARDED_DIR))["step"] == 3
    assert _spawn(_main, 2, _argv(part, *common, "--resume")) == [0, 0]
    (ta, ea), (tb, eb) = _plain_state(full, _argv(full)), _plain_state(part, _argv(part))
    assert ea["step"] == eb["step"] == 6 and ea["losses"] == eb["losses"] and len(ea["losses"]) == 6
    assert ea["world_size"] == 2 and len(ea["rng"]) == 2 and not torch.equal(ea["rng"][0]["data"], ea["rng"][1]["data"])
    _assert_same(ta, tb, "full vs resumed")
    assert ea["ema"] == eb["ema"]
    # a run from another seed differs (the comparison can fail)
    other = tmp_path / "other"
    assert _spawn(_main, 2, _argv(other, *common, "--seed", "1")) == [0, 0]
    assert _plain_state(other, _argv(other))[1]["losses"] != ea["losses"]


def _resume_and_report(rank, world, argv):
    """Resume (setup), report the loaded full state, train to the end of argv's --stop-after, report again."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)
    from flowmap_kernels.training.loop import finish, setup
    from flowmap_kernels.training.loop import train as train_loop
    cfg = resolve_config(train.build_parser().parse_args(argv))
    st = setup(cfg)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def snapshot():
        msd, osd = get_state_dict(st.model, st.opt, options=full)
        snap = {"model": msd, "optim": osd, "ema": get_model_state_dict(st.ema.module, options=full)}
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, snap), st.step  # not views of live state
    loaded = snapshot()
    train_loop(st)
    trained = snapshot()
    finish(st, 0.0)
    close_distributed()
    return (loaded, trained) if rank == 0 else None


def test_resume_reshards_1_to_2_and_2_to_1_and_plain_single_process(tmp_path):
    """A one-process FSDP2 run (--dp-shard 1) checkpoints at step 3; two processes (--dp-shard 2) resume it
    with the same parameters, Adam state and EMA, train to step 5 and checkpoint; a plain single process
    (no --dp-shard) resumes that with the same state and continues."""
    out = tmp_path / "run"
    assert train.main(_argv(out, "--steps", "8", "--dp-shard", "1", "--stop-after", "3")) == 0
    saved, ex = _plain_state(out, _argv(out))
    assert ex["step"] == 3 and ex["world_size"] == 1
    res = _spawn(_resume_and_report, 2, _argv(out, "--steps", "8", "--dp-shard", "2", "--resume", "--stop-after", "5"))
    (loaded, step0), (trained, step1) = res[0]
    assert step0 == 3 and step1 == 5
    _assert_same(saved, loaded, "1 -> 2: loaded state")
    saved2, ex2 = _plain_state(out, _argv(out))
    assert ex2["step"] == 5 and ex2["world_size"] == 2 and ex2["losses"][:3] == ex["losses"]
    _assert_same(saved2, trained, "2 ranks: checkpoint vs trained state")
    # 2 -> 1 without FSDP2: the plain loop loads the sharded checkpoint
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from flowmap_kernels.training.loop import setup
    from flowmap_kernels.training.loop import train as train_loop
    cfg = resolve_config(train.build_parser().parse_args(_argv(out, "--steps", "8", "--resume")))
    st = setup(cfg)
    try:
        assert st.step == 5 and st.losses == ex2["losses"] and st.sharded_ckpt
        msd, osd = get_state_dict(st.model, st.opt)
        _assert_same(saved2, {"model": msd, "optim": osd, "ema": get_model_state_dict(st.ema.module)}, "2 -> 1")
        train_loop(st)
    finally:
        close_distributed()
    final, ex3 = _plain_state(out, _argv(out))
    assert ex3["step"] == 8 and ex3["world_size"] == 1 and ex3["losses"][:5] == ex2["losses"]
    assert all(map(lambda v: bool(torch.isfinite(v).all()), final["model"].values()))


def test_killed_sharded_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A save that dies after writing its shards but before publishing them (simulated: an exception in
    the hook save_sharded calls just before the rename) leaves LATEST on the previous checkpoint; resuming
    from it reproduces the uninterrupted run bit for bit."""
    from flowmap_kernels.training.loop import run
    ref, out = tmp_path / "ref", tmp_path / "run"
    common = ["--steps", "6", "--ckpt-every", "2", "--dp-shard", "1"]
    assert train.main(_argv(ref, *common)) == 0

    class Killed(Exception):
        pass

    seen = []

    def die_at_step_4(tmp):
        seen.append(sorted(os.listdir(tmp)))
        if tmp.endswith("step-00000004"):
            raise Killed(tmp)
    cfg = resolve_config(train.build_parser().parse_args(_argv(out, *common)))
    with pytest.raises(Killed):
        try:
            run(dataclasses.replace(cfg, extra={"before_rename": die_at_step_4}))
        finally:
            close_distributed(barrier=False)
    assert ".metadata" in seen[-1] and "extras.pt" in seen[-1]  # the data was written
    root = out / SHARDED_DIR
    assert (root / ".tmp-step-00000004").is_dir() and (root / "LATEST").read_text().strip() == "step-00000002"
    assert load_sharded_extras(latest_sharded(root))["step"] == 2
    assert train.main(_argv(out, *common, "--resume")) == 0
    assert not (root / ".tmp-step-00000004").exists() and sorted(os.listdir(root)) == ["LATEST", "step-00000006"]
    (ta, ea), (tb, eb) = _plain_state(ref, _argv(ref)), _plain_state(out, _argv(out))
    assert ea["losses"] == eb["losses"] and len(ea["losses"]) == 6
    _assert_same(ta, tb, "uninterrupted vs resumed after a killed save")


def test_saving_the_same_step_again_keeps_latest_complete(tmp_path, monkeypatch):
    """Saving the step LATEST names again (a resumed run's first save) never removes that folder before
    LATEST names the new one: a save killed while publishing leaves the first one loadable, and a completed
    one replaces it under a new name."""
    from flowmap_kernels.training import checkpoint as ck

    def save(value, **kw):
        return ck.save_sharded(tmp_path, 5, {"w": torch.full((3,), float(value))}, {"step": 5, "value": value},
                               is_main=True, **kw)

    def loaded():
        path = latest_sharded(tmp_path)
        w = {"w": torch.zeros(3)}
        load_sharded(path, w)
        return torch.load(os.path.join(path, "extras.pt"), weights_only=True)["value"], w["w"]

    first = save(1)
    real_replace = os.replace

    class Killed(Exception):
        pass

    def killed_publish(src, dst):  # dies renaming the finished folder into place
        if os.path.basename(src).startswith(".tmp-step-"):
            raise Killed(src)
        return real_replace(src, dst)
    monkeypatch.setattr(ck.os, "replace", killed_publish)
    with pytest.raises(Killed):
        save(2)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    value, w = loaded()
    assert value == 1 and torch.equal(w, torch.full((3,), 1.0)) and os.path.isdir(first)
    second = save(3)
    assert second != first and not os.path.exists(first)
    value, w = loaded()
    assert value == 3 and torch.equal(w, torch.full((3,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["LATEST", os.path.basename(second)]


def test_context_parallel_with_activation_checkpointing_matches_one_process(tmp_path):
    """--dp-shard 1 --cp 2 (the DiT's 16 tokens split over 2 ranks, ring attention) with block activation
    checkpointing: the cp ranks share one batch, so the losses and parameters match a one-process FSDP2
    run up to float32 rounding."""
    dit = ["--data", "digits", "--model", "dit", "--batch", "4", "--no-progress", "--threads", "1", "--no-eval",
           "--method", "tvm", "--steps", "2", "--lr-schedule", "constant"]
    one, cp = tmp_path / "one", tmp_path / "cp"
    assert train.main(["--out", str(one), *dit, "--dp-shard", "1"]) == 0
    assert _spawn(_main, 2, ["--out", str(cp), *dit, "--dp-shard", "1", "--cp", "2",
                             "--activation-checkpointing", "blocks"]) == [0, 0]
    argv = ["--out", str(one), *dit]
    (ta, ea), (tb, eb) = _plain_state(one, argv), _plain_state(cp, argv)
    assert eb["args"]["cp"] == 2 and eb["world_size"] == 2
    assert torch.allclose(torch.tensor(ea["losses"]), torch.tensor(eb["losses"]), rtol=1e-5, atol=0)
    for k, v in ta["model"].items():
        assert torch.allclose(v, tb["model"][k], rtol=1e-4, atol=1e-6), k
    assert ta["model"]["final_layer.linear.weight"].abs().max() > 0  # zero-initialised, trained away from zero


@pytest.mark.parametrize("fsdp", [[], ["--dp-shard", "1"]])
def test_activation_checkpointing_trains_identically(tmp_path, fsdp):
    """--activation-checkpointing blocks / selective recompute the blocks in backward (through the JVP
    for tvm): the same losses and parameters as without, up to float32 rounding (one process, plain and FSDP2)."""
    runs = {}
    for mode in ("none", "blocks", "selective"):
        out = tmp_path / mode
        assert train.main(_argv(out, "--steps", "3", "--depth", "2", "--activation-checkpointing", mode, *fsdp)) == 0
        if fsdp:
            t, e = _plain_state(out, _argv(out))
            runs[mode] = (e["losses"], t["model"])
        else:
            ck = torch.load(out / "checkpoint.pt", weights_only=True)
            runs[mode] = (ck["losses"], ck["model"])
    for mode in ("blocks", "selective"):
        assert torch.allclose(torch.tensor(runs[mode][0]), torch.tensor(runs["none"][0]), rtol=1e-6, atol=0)
        for k, v in runs[mode][1].items():  # the recomputed backward may sum in another order
            assert torch.allclose(v, runs["none"][1][k], rtol=1e-5, atol=1e-7), (mode, k)


def _every_method(rank, world, root):
    """Each method, 2 steps on 2 ranks: plain data parallel (hand-written all-reduce) and FSDP2."""
    import torch.distributed as dist
    from flowmap_kernels.methods import METHODS
    dist.init_process_group("gloo")  # the caller's group: each train.main below uses it and leaves it alone
    res = {}
    for name in sorted(METHODS):
        for kind, extra in (("dp", []), ("fsdp", ["--dp-shard", "2"])):
            out = Path(root) / f"{name}_{kind}"
            ev = ["--eval-samples", "300"] if name == "tvm" else ["--no-eval"]
            argv = [a for a in _argv(out, "--steps", "2", "--method", name, *extra) if a != "--no-eval"] + ev
            assert train.main(argv) == 0, (name, kind)
            if rank == 0:
                import json
                if kind == "dp":
                    losses = torch.load(out / "checkpoint.pt", weights_only=True)["losses"]
                else:
                    losses = load_sharded_extras(latest_sharded(out / SHARDED_DIR))["losses"]
                res[(name, kind)] = (losses, json.loads((out / "metrics.json").read_text()))
    leave_process_group()
    return res


def test_every_method_trains_under_fsdp_like_plain_data_parallel(tmp_path):
    """Same seeds, same per-rank data: FSDP2's reduce-scattered gradients give the losses of the plain
    data-parallel path (float32 rounding); tvm's evaluation samples from the gathered full weights."""
    from flowmap_kernels.methods import METHODS
    res = _spawn(_every_method, 2, str(tmp_path))[0]
    for name in METHODS:
        (ld, md), (lf, mf) = res[(name, "dp")], res[(name, "fsdp")]
        assert len(lf) == 2 and all(map(lambda v: v == v, lf)), name
        assert torch.allclose(torch.tensor(ld), torch.tensor(lf), rtol=1e-5, atol=1e-7), (name, ld, lf)
        assert mf["ranks_in_sync"] and mf["parallel"]["dp_shard"] == 2 and mf["params"] == md["params"], name
    (_, md), (_, mf) = res[("tvm", "dp")], res[("tvm", "fsdp")]
    for k in ("1", "2", "4"):
        assert abs(md["nfe"][k]["ema"] - mf["nfe"][k]["ema"]) <= 1e-4 * md["nfe"][k]["ema"], (k, md["nfe"], mf["nfe"])


def test_hsdp_bf16_without_reshard_trains_and_stays_in_sync(tmp_path):
    """4 processes: --dp-replicate 2 --dp-shard 2 (HSDP), bf16 compute, --no-reshard-after-forward, TVM with
    its sharded EMA teacher; replicas stay identical, the checkpoint loads in one process."""
    out = tmp_path / "hsdp"
    argv = _argv(out, "--steps", "2", "--dp-replicate", "2", "--dp-shard", "2", "--mixed-precision", "bf16",
                 "--no-reshard-after-forward", "--ckpt-every", "1")
    assert _spawn(_main, 4, argv) == [0, 0, 0, 0]
    import json
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 4 and m["ranks_in_sync"] is True and m["parallel"]["mixed_precision"] == "bf16"
    tensors, ex = _plain_state(out, _argv(out))
    assert ex["step"] == 2 and len(ex["rng"]) == 4 and all(v == v for v in ex["losses"])
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in tensors["model"].values())


def test_fsdp_run_resumes_a_single_file_checkpoint(tmp_path):
    """A plain run's checkpoint.pt continues under FSDP2 (--dp-shard 1: full state dicts loaded into the
    sharded model, optimizer and EMA), with the same state; from then on it writes sharded checkpoints."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    from flowmap_kernels.training.loop import setup
    out = tmp_path / "run"
    assert train.main(_argv(out, "--steps", "6", "--stop-after", "3")) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    cfg = resolve_config(train.build_parser().parse_args(_argv(out, "--steps", "6", "--resume", "--dp-shard", "1")))
    st = setup(cfg)
    try:
        assert st.step == 3 and st.losses == ck["losses"] and st.ema.num_updates == ck["ema"]["num_updates"]
        msd, osd = get_state_dict(st.model, st.opt)
        names = [n for n, _ in st.model.named_parameters()]
        for k, v in ck["model"].items():
            assert torch.equal(msd[k].full_tensor(), v), k
        for k, v in ck["ema"]["module"].items():
            assert torch.equal(get_model_state_dict(st.ema.module)[k].full_tensor(), v), k
        for i, state in ck["opt"]["state"].items():
            for key, v in state.items():
                got = osd["state"][names[int(i)]][key]
                assert torch.equal(got.full_tensor() if hasattr(got, "full_tensor") else got, v), (i, key)
        from flowmap_kernels.training.loop import train as train_loop
        train_loop(st)
    finally:
        close_distributed()
    assert load_sharded_extras(latest_sharded(out / SHARDED_DIR))["step"] == 6
