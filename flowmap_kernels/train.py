"""Reference training loop for the flow-map methods, single process or data-parallel (torchrun).

    python -m flowmap_kernels.train                                   # demo: TVM on checkerboard
    python -m flowmap_kernels.train --method meanflow --data moons --steps 3000 --out runs/mf
    python -m flowmap_kernels.train --method meanflow --data moons --out runs/mf --steps 6000 --resume  # continue
    torchrun --nproc_per_node 2 -m flowmap_kernels.train --method tvm --steps 200

Writes into --out (rank 0 only, but sharded checkpoints from every rank): checkpoint.pt (model, EMA,
optimizer, all RNG states per rank, step, loss history, flags; loads with torch.load(weights_only=True);
single-process and plain data-parallel runs) or checkpoint_sharded/ (FSDP2 runs: torch.distributed.checkpoint,
resumable on any world size), metrics.json, loss_curve.png, samples.png, and
for 2D data reference.npy plus samples_nfe{1,2,4}.npy (10,000 points each). Flow-map methods are
sampled with 1, 2 and 4 steps from t = 1 to t = 0, flow matching with Euler at 1..64 steps. Metric:
sliced Wasserstein distance to fresh data (2D), Frechet distance on raw pixels (digits), with the
same metric for standard normal noise as the baseline. Samples use the EMA weights ("ema") and the raw
weights ("raw").

Data parallel: no DDP wrapper (torch.func.jvp cannot take one); rank 0's initial parameters are
broadcast, each rank draws its own data and noise (seed + rank), gradients are averaged by bucketed
all_reduce after every backward, and at the end the parameters are compared across ranks
(metrics.json: ranks_in_sync).

FSDP2 (--dp-shard N [--dp-replicate M] [--cp K]; N * M * K processes): model and EMA sharded with
torch.distributed.fsdp.fully_shard per block, HSDP over a 2-D mesh with --dp-replicate, bf16 compute
with --mixed-precision bf16; every method trains under it (JVP and backward through the JVP included).
    torchrun --nproc_per_node 2 -m flowmap_kernels.train --method tvm --dp-shard 2 --out runs/fsdp
    python -m flowmap_kernels.train --out runs/fsdp --resume      # a sharded checkpoint, one process

Parts: flowmap_kernels.training.config (flags -> TrainConfig), .loop (setup, step, checkpoint, run),
.evaluate (sampling and metrics).
"""
from __future__ import annotations

import argparse
import os
import sys

from .data import DATASETS, get_dataset
from .methods import METHODS, get_method
from .training import close_distributed
from .training.config import LOOP_DEFAULTS, PRESETS_2D, TrainConfig, resolve_config  # noqa: F401 (re-exported)
from .training.evaluate import EVAL_SEED  # noqa: F401 (re-exported)
from .training.loop import CHECKPOINT, SHARDED_DIR, NonFiniteLoss, build_model, run  # noqa: F401 (re-exported)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flowmap_kernels.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="tvm", help=f"one of {sorted(METHODS)}")
    p.add_argument("--data", default="checkerboard", help=f"one of {sorted(DATASETS)}")
    p.add_argument("--steps", type=int, default=3000, help="total optimisation steps (also the target of --resume)")
    p.add_argument("--batch", type=int, default=512, help="batch size per rank")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                   help="cosine: decay to 1%% of --lr over --steps after a 2%% linear warm-up")
    p.add_argument("--grad-clip", type=float, default=None,
                   help="max global grad norm (0: off; default 1.0, or the 2D preset's value)")
    p.add_argument("--no-preset", action="store_true", help="2D data: use the method DEFAULTS as they are")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="decay of the EMA of the weights: the teacher of methods with an EMA teacher and, without "
                        "--eval-ema-decay, the weights evaluated (default 0.995; with an evaluation EMA the "
                        "method's TEACHER_EMA_DECAY, TVM 0.99)")
    p.add_argument("--eval-ema-decay", type=float, default=None,
                   help="decay of a second EMA used only for evaluation/sampling, the first staying the teacher "
                        "(0: off, one EMA for both; default: the method's EVAL_EMA_DECAY, TVM 0.9999 as in "
                        "arXiv:2511.19797, off for the other methods and for TVM's 2D preset)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="output folder (default runs/<method>_<data>)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from <out>/{SHARDED_DIR} (sharded) or <out>/{CHECKPOINT}; the model-defining "
                        "flags must match, other changed flags are reported")
    p.add_argument("--overwrite", action="store_true",
                   help="without --resume: replace a checkpoint already in --out (refused otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=["auto", "mlp", "dit"], default="auto",
                   help="auto: MLP for 2D data, flowmap_kernels.nn.DiT for images when available")
    p.add_argument("--width", type=int, default=128, help="MLP hidden width")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks")
    p.add_argument("--time-freq", type=float, default=None,
                   help="MLP: highest time-embedding frequency (default 32, or the 2D preset's value)")
    p.add_argument("--cond", action="store_true", help="class-conditional (labels as model(..., y=))")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="with --cond: evaluate with classifier-free guidance of this scale (the method's GUIDANCE: "
                        "cfg, >= 0, 0 unconditional / input (imf) and scaled_input (tvm), > 0). Needs label "
                        "dropout (--cfg-dropout P > 0: it trains the null class) and, for imf / tvm, the guidance "
                        "input trained: --cfg cfg_omega_max=M (imf, scales in [1, 1+M]) or --cfg "
                        "cfg_scale_range=[1,MAX] (tvm); checked before training")
    p.add_argument("--cfg-dropout", type=float, default=None, metavar="P",
                   help="with --cond: label dropout for classifier-free guidance (the method's cfg_dropout; "
                        "> 0 with --guidance-scale)")
    p.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guidance only on sampling steps whose source time lies in [LO, HI] (default 0 1)")
    p.add_argument("--teacher", choices=["auto", "self", "ema"], default="auto",
                   help="stop-gradient teacher for tvm/lsd/esd/shortcut (auto: the method's TEACHER)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method DEFAULTS entry (JSON value of the default's type), repeatable")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this invocation after this many total steps (checkpointed; no evaluation); "
                        "the LR schedule still follows --steps, so --resume continues the same trajectory")
    p.add_argument("--eval-samples", type=int, default=10000)
    p.add_argument("--no-eval", action="store_true", help="skip sampling/metrics/figures")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--backend", default="auto",
                   help="kernel backend for fk.attention and the fused ops of --model dit (auto, naive, torch, "
                        "triton, extension); checked against the device before training (triton: CUDA, or "
                        "TRITON_INTERPRET=1 on CPU); no effect on the MLP")
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead"], default="none",
                   help="torch.compile the whole step (loss with its JVP, backward, clipping, Adam) with "
                        "fullgraph=True (flowmap_kernels.compiled_step); one process, no FSDP2; metrics.json "
                        "reports compile_s apart from sec_per_step")
    g = p.add_argument_group("FSDP2 (torchrun; processes = dp-replicate x dp-shard x cp)")
    g.add_argument("--dp-shard", type=int, default=None,
                   help="shard model, EMA and optimizer over this many ranks with FSDP2 (fully_shard); "
                        "without it, torchrun runs plain data parallel")
    g.add_argument("--dp-replicate", type=int, default=None, help="HSDP: replicas of the dp-shard group (2-D mesh)")
    g.add_argument("--cp", type=int, default=1,
                   help="context parallel ranks over the DiT's tokens (flowmap_kernels.distributed.context_parallel)")
    g.add_argument("--cp-mode", choices=["ring", "ulysses"], default="ring",
                   help="context parallel attention: ring of K/V blocks, or all-to-all to heads")
    g.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="free gathered parameters after each forward (less memory, one more all-gather)")
    g.add_argument("--mixed-precision", choices=["none", "bf16"], default="none",
                   help="bf16: compute in bf16, reduce gradients in fp32 (parameters and Adam stay fp32)")
    g.add_argument("--activation-checkpointing", choices=["none", "blocks", "selective"], default="none",
                   help="recompute activations in backward (flowmap_kernels.activation_checkpoint)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    finished = False
    try:
        for flag, lookup, value in (("--method", get_method, args.method), ("--data", get_dataset, args.data)):
            try:
                lookup(value)
            except ValueError as e:  # "method: unknown method ..." -> "--method: unknown method ..."
                raise ValueError(f"{flag}: {str(e).split(': ', 1)[-1]}") from e
        cfg = resolve_config(args)  # every flag checked before any work
        if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
            for note in cfg.warnings:
                print(f"warning: {note}", file=sys.stderr)
        from .backends import use_backend
        with use_backend(cfg.backend):
            metrics = run(cfg)
        finished = True
    except (ValueError, PermissionError, FileNotFoundError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        close_distributed(barrier=finished)
    if metrics:
        nfe = metrics.get("nfe", {})
        summary = ", ".join(f"{k} step{'s' if k != '1' else ''}: {v['ema']:.4f}" for k, v in nfe.items())
        if nfe:
            print(f"{metrics['metric']} to fresh data (noise baseline {metrics['baseline_noise']:.4f}): {summary}")
        print(f"wrote {cfg.out}/metrics.json "
              f"(train {metrics['train_time_s']:.1f}s, ranks_in_sync={metrics['ranks_in_sync']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
