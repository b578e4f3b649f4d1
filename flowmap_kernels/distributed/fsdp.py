"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for flow-map training, where the loss differentiates
the model in forward mode (``torch.func.jvp``) and, for TVM / LSD / ESD, backpropagates through the JVP.

    mesh = make_mesh(dp_replicate=1, dp_shard=world_size)      # 1-D: FSDP; (2, 2): HSDP
    apply_fsdp(model, mesh, mixed_precision="bf16")             # fully_shard per block, then the root
    V, dV = torch.func.jvp(model, (x, s, t), (tx, ts, tt)); loss(V, dV).backward()   # grads reduce-scattered

What works in torch 2.13 (tests/training/test_fsdp.py; docs/scaling.md "FSDP2 training"):
``torch.func.jvp`` through fully_shard modules, with a backward through both outputs: parameter
gradients equal the unsharded model's on the full batch (float64). Under the same version,
``torch.autograd.forward_ad`` dual tensors through fully_shard fail (FSDP's all-gather hook returns a
view from a custom Function), and the composable ``replicate`` (DDP-style) fails under torch.func.jvp.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["apply_fsdp", "make_mesh", "fsdp_blocks", "mixed_precision_policy", "MESH_DIM_NAMES"]

MESH_DIM_NAMES = ("dp_replicate", "dp_shard", "cp")


def make_mesh(dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1, *, device_type: Optional[str] = None):
    """A 3-D DeviceMesh (dp_replicate, dp_shard, cp) over the default process group, named MESH_DIM_NAMES.

    dp_replicate * dp_shard * cp must equal the world size. ``device_type``: "cuda" when CUDA is
    available, else "cpu" (gloo). Take sub-meshes by name: ``mesh["dp_shard"]`` (FSDP),
    ``mesh["dp_replicate", "dp_shard"]`` (HSDP), ``mesh["cp"]``; ``data_parallel_mesh`` picks the one
    apply_fsdp wants."""
    for name, v in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard), ("cp", cp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
    if not dist.is_initialized():
        raise RuntimeError("make_mesh: no default process group; launch with torchrun (or call "
                           "torch.distributed.init_process_group) first")
    world = dist.get_world_size()
    if dp_replicate * dp_shard * cp != world:
        raise ValueError(f"dp_replicate * dp_shard * cp = {dp_replicate} * {dp_shard} * {cp} = "
                         f"{dp_replicate * dp_shard * cp}, expected the world size {world}")
    from torch.distributed.device_mesh import init_device_mesh
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dp_replicate, dp_shard, cp), mesh_dim_names=MESH_DIM_NAMES)


def data_parallel_mesh(mesh):
    """The mesh apply_fsdp shards over, from make_mesh's 3-D mesh: "dp_shard" (1-D) when dp_replicate is
    1, else ("dp_replicate", "dp_shard") (2-D, HSDP). With cp > 1 the shard dimension is dp_shard x cp
    flattened: the cp ranks of one data-parallel group hold the same batch and see different tokens, so
    the average over that flattened dimension is the data-parallel average of per-rank token means."""
    names = mesh.mesh_dim_names
    if names is None or tuple(names) != MESH_DIM_NAMES:
        raise ValueError(f"mesh: expected dims named {MESH_DIM_NAMES} (make_mesh), got {names}")
    replicate, cp = mesh["dp_replicate"].size(), mesh["cp"].size()
    if cp == 1:
        return mesh["dp_replicate", "dp_shard"] if replicate > 1 else mesh["dp_shard"]
    cached = getattr(mesh, "_flowmap_dp_mesh", None)  # one set of process groups per mesh (model and EMA)
    if cached is None:
        if replicate == 1:
            cached = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        else:  # ranks are laid out (dp_replicate, dp_shard, cp) row-major: (R, S * cp) groups them the same
            from torch.distributed.device_mesh import init_device_mesh
            cached = init_device_mesh(mesh.device_type, (replicate, mesh["dp_shard"].size() * cp),
                                      mesh_dim_names=("dp_replicate", "dp_shard_cp"))
        mesh._flowmap_dp_mesh = cached
    return cached


def fsdp_blocks(model: nn.Module, blocks=None) -> list:
    """The modules apply_fsdp shards one by one: ``blocks`` when given (a list or nn.ModuleList of
    modules inside ``model``), else the first ``.blocks`` (the package's DiT and MLPFlowMap) or
    ``.transformer_blocks`` (diffusers transformers) on the model or a module it wraps, else none (the
    root alone)."""
    if blocks is None:
        found = None
        for sub in model.modules():  # the model itself first, then wrapped networks (pre-order)
            for attr in ("blocks", "transformer_blocks"):
                if isinstance(getattr(sub, attr, None), (nn.ModuleList, list, tuple)):
                    found = getattr(sub, attr)
                    break
            if found is not None:
                break
        if found is None:
            return []
        blocks = found
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"blocks: expected a list or nn.ModuleList of modules, got {type(blocks).__name__}")
    blocks = list(blocks)
    inside = {id(m) for m in model.modules()}
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise TypeError(f"blocks[{i}]: expected an nn.Module, got {type(b).__name__}")
        if id(b) not in inside:
            raise ValueError(f"blocks[{i}]: {type(b).__name__} is not a submodule of the model")
    return blocks


def mixed_precision_policy(mixed_precision):
    """None / "none" -> full precision; "bf16" -> MixedPrecisionPolicy(param_dtype=bfloat16,
    reduce_dtype=float32) (compute in bf16, gradients reduced in fp32, sharded parameters and the
    optimizer stay fp32); a MixedPrecisionPolicy passes through."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mixed_precision is None or mixed_precision == "none":
        return MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision
    raise ValueError(f"mixed_precision: expected None, 'none', 'bf16' or a MixedPrecisionPolicy, "
                     f"got {mixed_precision!r}")


def apply_fsdp(model: nn.Module, mesh=None, *, reshard_after_forward: bool = True,
               mixed_precision: Union[None, str, object] = None,
               blocks: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Shard ``model`` in place with FSDP2 and return it: ``fully_shard`` on each block (fsdp_blocks),
    then on the root (the embeddings, final layer and any parameter outside the blocks).

    mesh: a 1-D DeviceMesh (FSDP: parameters sharded over its ranks), a 2-D one (HSDP: replicated over
    dim 0, sharded over dim 1), make_mesh's 3-D (dp_replicate, dp_shard, cp) mesh (reduced with
    data_parallel_mesh), or None (1-D over the whole default group). Parameters become DTensors (dim 0
    sharded); forward/JVP all-gather them per block, backward reduce-scatters the gradients, averaged
    over the data-parallel ranks. reshard_after_forward: free the gathered parameters after each forward
    (less memory, one more all-gather in backward). mixed_precision: see mixed_precision_policy.
    Build the optimizer after this call (on model.parameters())."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward: expected a bool, got {type(reshard_after_forward).__name__}")
    from torch.distributed.device_mesh import DeviceMesh
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a DeviceMesh (make_mesh) or None, got {type(mesh).__name__}")
    from torch.distributed.fsdp import fully_shard
    policy = mixed_precision_policy(mixed_precision)
    block_list = fsdp_blocks(model, blocks)
    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError("apply_fsdp: no default process group and no mesh; launch with torchrun first")
        mesh = make_mesh(1, dist.get_world_size())
    if mesh.ndim == 3:
        mesh = data_parallel_mesh(mesh)
    if mesh.ndim not in (1, 2):
        raise ValueError(f"mesh: expected a 1-D (FSDP) or 2-D (HSDP) DeviceMesh, got {mesh.ndim} dims")
    for unit in outside_units(block_list) + block_list:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def outside_units(blocks: list) -> list:
    """Submodules of the blocks that run outside their block's forward, so they need units of their own
    (innermost first): modules shared by several blocks (e.g. DiffusersFlowMap's interval embedder), and a
    diffusers block's ``norm1.emb`` (DiTTransformer2DModel computes its conditioning with
    ``transformer_blocks[0].norm1.emb`` before the blocks run)."""
    owner, shared = {}, []
    for b in blocks:
        for m in b.modules():
            if m is not b and owner.setdefault(id(m), b) is not b and all(m is not x for x in shared):
                shared.append(m)
    top_shared = [m for m in shared if not any(o is not m and any(c is m for c in o.modules()) for o in shared)]
    embs = [b.norm1.emb for b in blocks
            if isinstance(getattr(getattr(b, "norm1", None), "emb", None), nn.Module)]
    return top_shared + [e for e in embs if not any(e is m for m in top_shared)]
