"""Context parallelism: attention (and a DiT) over a token sequence sharded across a process group.

``shard_sequence`` / ``gather_sequence`` split and reassemble a sequence; ``context_parallel_attention``
(and its explicit ``_jvp`` form) runs attention on the shards, by a ring of K/V blocks (``mode="ring"``)
or by all-to-all re-sharding to heads (``mode="ulysses"``), with forward-mode AD and backward through the
tangent; ``context_parallel(model, group)`` switches a DiT to it (the package's, or a diffusers DiT in a
``DiffusersFlowMap``). ``count_communication`` measures the
bytes sent. ``apply_fsdp(model, mesh)`` shards a model with FSDP2 (fully_shard per block, then the root)
over ``make_mesh(dp_replicate, dp_shard, cp)``. See docs/scaling.md.
"""
from .attention import context_parallel_attention, context_parallel_attention_jvp
from .comm import CommCounter, SequenceLayout, count_communication
from .fsdp import apply_fsdp, make_mesh
from .model import ContextParallelConfig, context_parallel
from .sharding import gather_sequence, shard_sequence

__all__ = ["context_parallel_attention", "context_parallel_attention_jvp", "shard_sequence", "gather_sequence",
           "context_parallel", "ContextParallelConfig", "count_communication", "CommCounter", "SequenceLayout",
           "apply_fsdp", "make_mesh"]
