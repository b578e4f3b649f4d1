"""Context parallelism for a diffusers DiT through DiffusersFlowMap, on 2 and 4 gloo processes against one process.

``context_parallel(flowmap, group, mode, load_balance)`` shards the tokens after diffusers' patch embedding,
routes the attention processors to context_parallel_attention and gathers after the output projection.
float64, a 2-layer DiT on 10x10 latents (25 tokens: an uneven split): the output, the tangent of
torch.func.jvp along (x, s, t), and the gradients of a loss on both (every parameter, and x; averaged over
the group; as one vector, and each parameter whose exact gradient is not zero) equal the one-process
model's within the float64 tolerance, ring and Ulysses, with and without load balancing,
and with activation checkpointing of the blocks. The switch's errors (a module that is not per-token, a
processor it cannot replace, Ulysses with indivisible heads, an unwrapped transformer) run in the same job.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install diffusers)")

import torch.distributed as dist  # noqa: E402

from tests.distributed.harness import spawn  # noqa: E402
from tests.distributed.workers import _max_over_ranks, _raises  # noqa: E402
from tests.numerics import TOLERANCE, rel_err  # noqa: E402
from tests.reference import random_parameters_  # noqa: E402

TOL = TOLERANCE[torch.float64]  # relative, norm ratio (tests/numerics.py: 1e-11)
CONFIGS = [("ring", False, False), ("ring", True, False), ("ulysses", False, False), ("ulysses", True, False),
           ("ring", True, True)]  # (mode, load_balance, activation checkpointing of the blocks)


def _flowmap(heads=2, seed=0):
    """DiffusersFlowMap around a 2-layer DiTTransformer2DModel (10x10x4 latents, patch 2: 25 tokens), every
    parameter random (no zero-initialised layer), float64, attention through FlowmapAttnProcessor."""
    from diffusers import DiTTransformer2DModel

    from flowmap_kernels.integrations.diffusers import DiffusersFlowMap, set_flowmap_attention
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=12, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=10, patch_size=2, num_embeds_ada_norm=10)
    fm = DiffusersFlowMap(dit).double()
    random_parameters_(fm, seed + 1, 0.2)
    set_flowmap_attention(fm, strict=True)
    return fm


def _run(fm, x, s, t, y, tangents):
    """(V, tV, grads): torch.func.jvp of the flow map along tangents (of x, s, t) and the gradients of a
    TVM-style loss on (V, tV) for every parameter and x."""
    fm.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    v, tv = torch.func.jvp(lambda a, b, c: fm(a, b, c, y), (xx, s, t), tangents)
    loss = ((v - tv) ** 2).sum() + (v * tv).sum()
    loss.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in fm.parameters()]
    return v.detach(), tv.detach(), grads + [xx.grad.clone()]


def _cp_matches_one_process(rank, world):
    import flowmap_kernels.distributed as fkd
    from flowmap_kernels.integrations.diffusers import FlowmapAttnProcessor, checkpoint_transformer_blocks

    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 10, 10, generator=g, dtype=torch.float64)
    s = torch.tensor([0.9, 0.6], dtype=torch.float64)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    tangents = (torch.randn(x.shape, generator=g, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                torch.full((2,), 0.5, dtype=torch.float64))
    y = torch.tensor([3, 7])
    out = {}
    heads = max(2, world)  # Ulysses splits the heads over the group
    for mode, lb, ckpt in CONFIGS:
        fm = _flowmap(heads=heads)
        if ckpt:
            checkpoint_transformer_blocks(fm, "blocks")
        v0, tv0, g0 = _run(fm, x, s, t, y, tangents)
        with fkd.context_parallel(fm, None, mode=mode, load_balance=lb):
            local_tokens = []
            fm.transformer.transformer_blocks[0].register_forward_pre_hook(
                lambda m, a: local_tokens.append(a[0].shape[1]))
            v1, tv1, g1 = _run(fm, x, s, t, y, tangents)
        for gr in g1:  # the convention of context_parallel: the group average of a gradient is exact
            dist.all_reduce(gr)
            gr /= world
        flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
        scale = flat(g0).norm()
        # all gradients as one vector, and each one that is not zero in exact arithmetic on its own (the key
        # biases' gradient is, by the softmax's shift invariance: only rounding noise)
        errs = {"v": rel_err(v1, v0), "tv": rel_err(tv1, tv0), "grads": rel_err(flat(g1), flat(g0)),
                "grad_each": max(rel_err(a, b) for a, b in zip(g1, g0) if b.norm() > 1e-9 * scale)}
        errs = _max_over_ranks(errs)
        tr = fm.transformer
        errs["restored"] = float(all(type(m.processor) is FlowmapAttnProcessor for m in tr.modules()
                                     if hasattr(m, "processor"))
                                 and not tr.pos_embed._forward_hooks and not tr.proj_out_2._forward_hooks)
        errs["local_tokens"] = local_tokens[0]  # rank 0's share of the 25 tokens (the same with lb)
        out[(mode, lb, ckpt)] = errs
    return dict(cp=out, errors=_error_checks(rank, world) if world == 2 else None)


def _error_checks(rank, world):
    from diffusers.models.attention_processor import AttnAddedKVProcessor
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    import flowmap_kernels.distributed as fkd
    from flowmap_kernels.integrations.diffusers import FlowmapAttnProcessor

    res = {}
    fm = _flowmap()
    block = fm.transformer.transformer_blocks[1]
    block.pos_embed = SinusoidalPositionalEmbedding(24, max_seq_length=32)  # position-dependent, per block
    res["token_mixing_module"] = _raises(lambda: fkd.context_parallel(fm), ValueError,
                                         "transformer.transformer_blocks.1.pos_embed (SinusoidalPositionalEmbedding)")
    res["nothing_changed"] = (type(fm.transformer.transformer_blocks[0].attn1.processor) is FlowmapAttnProcessor
                              and not fm.transformer.pos_embed._forward_hooks)
    fm = _flowmap()
    fm.transformer.transformer_blocks[0].attn1.set_processor(AttnAddedKVProcessor())
    res["processor"] = _raises(lambda: fkd.context_parallel(fm), ValueError,
                               "transformer.transformer_blocks.0.attn1 has attention processor AttnAddedKVProcessor")
    res["ulysses_heads"] = _raises(lambda: fkd.context_parallel(_flowmap(heads=3), mode="ulysses"), ValueError,
                                   "attn1 (3) divisible by the group size (2)")
    res["unwrapped_transformer"] = _raises(lambda: fkd.context_parallel(_flowmap().transformer), ValueError,
                                           "DiffusersFlowMap")
    fm = _flowmap()
    with fkd.context_parallel(fm, mode="ring"):
        res["twice"] = _raises(lambda: fkd.context_parallel(fm), ValueError, "already context-parallel")
        attn = fm.transformer.transformer_blocks[0].attn1
        h, enc = torch.randn(1, 13 - rank, 24, dtype=torch.float64), torch.randn(1, 5, 24, dtype=torch.float64)
        res["cross_attention_call"] = _raises(lambda: attn(h, encoder_hidden_states=enc), ValueError,
                                              "self-attention")
        # an argument only rank 1 gets wrong is raised there and named on the other rank (which waited in the
        # blocks' attention before); inputs that differ between ranks are named on every rank
        x, s = torch.randn(2, 4, 10, 10, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
        y = torch.tensor([1, 2])
        for what, args, message in (("x", (x[:, :3] if rank == 1 else x, s, s, y), "x: expected"),
                                    ("s", (x, s.repeat(2) if rank == 1 else s, s, y), "s: expected"),
                                    ("y", (x, s, s, y.float() if rank == 1 else y), "y: expected")):
            res[f"one_rank_bad_{what}"] = _raises(lambda: fm(*args), ValueError,
                                                  message if rank == 1 else "rank(s) [1] of the group")
        res["inputs_differ"] = _raises(lambda: fm(x, s, s, None if rank == 1 else y), ValueError,
                                       "DiffusersFlowMap: under context parallelism every rank")
        res["agreeing_call_runs"] = fm(x, s, s, y).shape == x.shape
    return res


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawn(_cp_matches_one_process, 2, tmp_path_factory.mktemp("cp_diffusers"))


@pytest.mark.parametrize("world, rank0_tokens", [(2, 13), (4, 7)])
def test_diffusers_flowmap_context_parallel_matches_one_process(world, rank0_tokens, world2, tmp_path):
    res = (world2 if world == 2 else spawn(_cp_matches_one_process, world, tmp_path))["cp"]
    assert set(res) == set(CONFIGS)
    for key, errs in res.items():
        assert errs["restored"] == 1.0, key
        assert errs["local_tokens"] == rank0_tokens, (key, errs)  # 25 tokens: 13 / 12, or 7 / 6 / 6 / 6
        assert max(errs["v"], errs["tv"], errs["grads"], errs["grad_each"]) < TOL, (key, errs)


def test_diffusers_flowmap_context_parallel_errors(world2):
    assert world2["errors"] and all(world2["errors"].values()), world2["errors"]
