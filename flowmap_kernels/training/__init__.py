"""Helpers of the reference training loop (flowmap_kernels.train): EMA, data-parallel gradient sync,
checkpoints with exact resume, plots."""
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import (DistInfo, allreduce_grads, broadcast_module, close_distributed, init_distributed,
                          params_in_sync)
from .ema import EMA

__all__ = ["EMA", "DistInfo", "init_distributed", "close_distributed", "broadcast_module", "allreduce_grads",
           "params_in_sync", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]
