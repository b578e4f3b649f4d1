"""FSDP2 (fully_shard) under the flow-map losses' forward-mode AD: gradients against the unsharded model
(float64), HSDP, bf16 mixed precision, and the boundaries of torch 2.13 (forward_ad, replicate).

Each test spawns gloo processes (one thread each, tests/distributed/harness.py); every rank's result comes back."""
from __future__ import annotations

import pytest
import torch

from flowmap_kernels.distributed.fsdp import apply_fsdp, fsdp_blocks, make_mesh, mixed_precision_policy
from tests.distributed.harness import spawn


def _models(kind):
    from flowmap_kernels.models import MLPFlowMap
    from flowmap_kernels.nn import dit_tiny
    torch.manual_seed(0)
    if kind == "mlp":
        m = MLPFlowMap((2,), hidden=16, depth=2, emb_dim=8, max_freq=8.0)
    elif kind == "diffusers":  # a third-party DiT through the integration (its transformer_blocks sharded)
        from diffusers import DiTTransformer2DModel
        from flowmap_kernels.integrations.diffusers import DiffusersFlowMap, set_flowmap_attention
        dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                    num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
        set_flowmap_attention(dit)
        m = DiffusersFlowMap(dit)
    else:
        m = dit_tiny(input_size=4, hidden_size=16, depth=2, num_heads=2, num_classes=0)
    m = m.double()
    for p in m.parameters():  # the zero-initialised output layers would hide gradients of earlier layers
        torch.nn.init.normal_(p, std=0.3)
    return m


def _batch(kind, n):
    g = torch.Generator().manual_seed(1)
    return torch.randn((n, 2) if kind == "mlp" else (n, 1, 4, 4), generator=g, dtype=torch.float64)


def _grads_vs_unsharded(rank, world, kind, methods, mesh_shape):
    """Per method: max |grad_fsdp - grad_ref| / max |grad_ref| over all parameters, where grad_ref is the
    unsharded model's gradient of the full-batch objective (the mean of every rank's loss on its part)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from flowmap_kernels.methods import get_method
    ref = _models(kind)
    model = apply_fsdp(_models(kind), make_mesh(*mesh_shape))
    x = _batch(kind, 2 * world)
    out = {}
    for name in methods:
        method = get_method(name)
        cfg = {"ratio_neq": 1.0} if "ratio_neq" in method.DEFAULTS else {}

        def loss(net, r):
            g = torch.Generator().manual_seed(100 + r)
            return method.loss(net, x[2 * r: 2 * r + 2], generator=g, **cfg)[0]
        ref.zero_grad(set_to_none=True)
        (sum(loss(ref, r) for r in range(world)) / world).backward()
        model.zero_grad(set_to_none=True)
        loss(model, rank).backward()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        scale = max(p.grad.abs().max().item() for p in ref.parameters())
        err = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
        same_params = all(torch.equal(full[n], p) for n, p in ref.named_parameters())
        out[name] = (err / scale, scale, same_params, sorted(grads) == sorted(n for n, _ in ref.named_parameters()))
    return out


@pytest.mark.parametrize("kind,methods", [("mlp", ("tvm", "meanflow", "esd")), ("dit", ("tvm", "meanflow")),
                                          ("diffusers", ("tvm", "meanflow"))])
def test_fsdp_jvp_gradients_equal_unsharded_float64(kind, methods):
    """fully_shard per block + root on 2 ranks; torch.func.jvp (and, for tvm/esd, backward through it)."""
    for rank_out in spawn(_grads_vs_unsharded, 2, None, kind, methods, (1, 2, 1), timeout=240, all_ranks=True):
        for name, (rel, scale, same_params, names_match) in rank_out.items():
            assert names_match and same_params, name
            assert scale > 1e-3, (name, scale)  # gradients that are not trivially zero
            assert rel < 1e-12, (kind, name, rel)


def test_hsdp_2x2_gradients_equal_unsharded_float64():
    """HSDP: 4 ranks, replicate 2 x shard 2 (2-D mesh)."""
    for rank_out in spawn(_grads_vs_unsharded, 4, None, "mlp", ("tvm",), (2, 2, 1), timeout=240, all_ranks=True):
        rel, scale, same_params, names_match = rank_out["tvm"]
        assert names_match and same_params and scale > 1e-3 and rel < 1e-12, rank_out


def _boundaries(rank, world):
    """What fails in this torch version: forward_ad duals through fully_shard; composable replicate
    under torch.func.jvp. And bf16 mixed precision: a JVP + backward runs, fp32 sharded parameters."""
    import torch.autograd.forward_ad as fwAD
    from flowmap_kernels.methods import get_method
    from flowmap_kernels.models import MLPFlowMap
    res = {}
    torch.manual_seed(0)
    model = apply_fsdp(MLPFlowMap((2,), hidden=16, depth=2, emb_dim=8), make_mesh(1, world))
    x, s = torch.randn(4, 2), torch.rand(4)
    try:
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, torch.randn_like(x)), s, s)
            fwAD.unpack_dual(out).tangent.sum().backward()
        res["forward_ad"] = "ok"
    except Exception as e:  # noqa: BLE001 - the message is the result
        res["forward_ad"] = f"{type(e).__name__}: {e}"
    try:
        from torch.distributed._composable.replicate import replicate
        torch.manual_seed(0)
        m2 = replicate(MLPFlowMap((2,), hidden=16, depth=1, emb_dim=8))
        o, to = torch.func.jvp(lambda x: m2(x, s, s), (x,), (torch.randn_like(x),))
        (o.sum() + to.sum()).backward()
        res["replicate"] = "ok"
    except Exception as e:  # noqa: BLE001
        res["replicate"] = f"{type(e).__name__}: {e}"
    torch.manual_seed(0)
    mp_model = apply_fsdp(MLPFlowMap((2,), hidden=16, depth=2, emb_dim=8), make_mesh(1, world),
                          mixed_precision="bf16")
    loss, _ = get_method("tvm").loss(mp_model, torch.randn(4, 2), generator=torch.Generator().manual_seed(rank))
    loss.backward()
    res["bf16"] = (str(loss.dtype), {str(p.dtype) for p in mp_model.parameters()},
                   {str(p.grad.dtype) for p in mp_model.parameters()},
                   all(bool(torch.isfinite(p.grad.to_local()).all()) for p in mp_model.parameters()),
                   max(p.grad.abs().max().item() for p in mp_model.parameters()))
    return res


def test_boundaries_forward_ad_replicate_and_bf16():
    for res in spawn(_boundaries, 2, None, timeout=240, all_ranks=True):
        assert res["forward_ad"] != "ok" and "view" in res["forward_ad"], res["forward_ad"]
        assert res["replicate"] != "ok", res["replicate"]
        loss_dtype, p_dtypes, g_dtypes, finite, gmax = res["bf16"]
        assert p_dtypes == {"torch.float32"} and g_dtypes == {"torch.float32"} and finite and gmax > 0


def test_fsdp_blocks_and_policy_arguments():
    from flowmap_kernels.models import MLPFlowMap
    m = MLPFlowMap((2,), hidden=8, depth=3, emb_dim=8)
    assert fsdp_blocks(m) == list(m.blocks)
    assert fsdp_blocks(m, [m.inp, m.out]) == [m.inp, m.out]
    assert fsdp_blocks(torch.nn.Linear(2, 2)) == []
    with pytest.raises(ValueError, match=r"blocks\[0\]: Linear is not a submodule"):
        fsdp_blocks(m, [torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="blocks"):
        fsdp_blocks(m, m.inp)
    with pytest.raises(TypeError, match=r"blocks\[1\]"):
        fsdp_blocks(m, [m.inp, 3])
    p = mixed_precision_policy("bf16")
    assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32
    assert mixed_precision_policy(None).param_dtype is None
    with pytest.raises(ValueError, match="mixed_precision"):
        mixed_precision_policy("fp8")
    with pytest.raises(ValueError, match="dp_shard"):
        make_mesh(1, 0)
    with pytest.raises(TypeError, match="model"):
        apply_fsdp("not a module")
    with pytest.raises(TypeError, match="mesh: expected a DeviceMesh"):  # (was AttributeError: no 'ndim')
        apply_fsdp(m, "cpu")


def _meta_built(rank, world):
    """A DiT built on the meta device, sharded, materialised with to_empty, then (a) the trained model's full state
    dict loaded through set_model_state_dict, (b) init_weights: outputs against the unsharded models."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from flowmap_kernels.nn import DiT, init_weights
    kw = dict(input_size=4, patch_size=2, hidden_size=16, depth=2, num_heads=2, freq_dim=8, qk_norm=True)
    torch.manual_seed(0)
    trained = DiT(**kw)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, s, t = torch.randn(2, 1, 4, 4, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)
    y = torch.tensor([1, 3])
    out = {}
    for how in ("load", "init_weights"):
        with torch.device("meta"):
            model = DiT(**kw)
        apply_fsdp(model, make_mesh(1, world))
        model.to_empty(device="cpu")
        if how == "load":
            set_model_state_dict(model, trained.state_dict(), options=StateDictOptions(full_state_dict=True))
            want = trained(x, s, t, y=y)
        else:
            init_weights(model)
            want = torch.zeros(2, 1, 4, 4)  # adaLN-Zero: the initial model outputs zero
        out[how] = (model(x, s, t, y=y) - want).abs().max().item()
    return out


def test_meta_device_build_under_fsdp():
    for res in spawn(_meta_built, 2, None, timeout=240, all_ranks=True):
        assert res == {"load": 0.0, "init_weights": 0.0}, res
