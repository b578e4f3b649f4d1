"""The reference training loop (flowmap_kernels.train) in parts: config resolution (config), setup / step /
checkpoint / run (loop), sampling and metrics (evaluate); EMA, data-parallel gradient sync, checkpoints
with exact resume (single file and sharded), plots."""
from .checkpoint import (latest_sharded, load_checkpoint, load_sharded, load_sharded_extras, rng_state,
                         save_checkpoint, save_sharded, set_rng_state)
from .config import TrainConfig, resolve_config
from .distributed import (DistInfo, allreduce_grads, broadcast_module, close_distributed, init_distributed,
                          params_in_sync)
from .ema import EMA

__all__ = ["EMA", "DistInfo", "init_distributed", "close_distributed", "broadcast_module", "allreduce_grads",
           "params_in_sync", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state",
           "save_sharded", "load_sharded", "load_sharded_extras", "latest_sharded", "TrainConfig", "resolve_config"]
