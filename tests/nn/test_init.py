"""Models built on the meta device (the FSDP2 path at scale): ``to_empty`` then a checkpoint load gives the
trained model exactly (computed buffers rebuilt), and ``init_weights`` (or any per-module reset loop) gives
the constructor's initialisation."""
import pytest
import torch

from flowmap_kernels.models import MLPFlowMap
from flowmap_kernels.nn import DiT, Linear, RMSNorm, init_weights
from flowmap_kernels.nn.layers import FinalLayer

SMALL = dict(input_size=4, patch_size=2, hidden_size=16, depth=2, num_heads=2, freq_dim=8, qk_norm=True,
             guidance_dim=1)


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    if isinstance(model, DiT):
        return (torch.randn(2, 1, 4, 4, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)), \
            dict(y=torch.tensor([1, 3]), w=torch.tensor([1.5, 2.0]))
    return (torch.randn(2, 2, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g)), {}


def _randomised(make):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" model: no zero-initialised layer left
    return model


@pytest.mark.parametrize("make", [lambda: DiT(**SMALL), lambda: MLPFlowMap(hidden=32, depth=2, emb_dim=8)],
                         ids=["dit", "mlp_flow_map"])
def test_meta_build_then_checkpoint_load_is_the_trained_model(make):
    trained = _randomised(make)
    with torch.device("meta"):
        model = make()
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict(), strict=True)
    args, kwargs = _inputs(model)
    assert torch.equal(model(*args, **kwargs), trained(*args, **kwargs))


@pytest.mark.parametrize("order", ["init_weights", "parents_first", "children_first"])
def test_meta_build_then_reset_is_the_constructors_initialisation(order):
    torch.manual_seed(0)
    fresh = DiT(**SMALL)
    with torch.device("meta"):
        model = DiT(**SMALL)
    model.to_empty(device="cpu")
    if order == "init_weights":
        assert init_weights(model) is model
    else:
        modules = list(model.modules())
        for m in modules if order == "parents_first" else reversed(modules):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    want = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        ref = want[name]
        if ref.abs().max() == 0 or torch.all(ref == 1):  # adaLN-Zero / final layers, biases, RMSNorm weights
            assert torch.equal(p, ref), name
        else:  # random draws: the same law (std within 25%: at least 16 entries)
            assert 0.75 < p.std() / ref.std() < 1.33, name
    assert torch.equal(model.pos_embed, fresh.pos_embed)
    args, kwargs = _inputs(model)
    assert torch.equal(model(*args, **kwargs), fresh(*args, **kwargs))  # both exactly 0 (adaLN-Zero)


def test_float64_model_rebuilds_the_buffer_it_was_built_with():
    """After .double() and a load, pos_embed is the constructor's (float32 values in float64): a reloaded model
    computes what the one it was saved from does."""
    model = _randomised(lambda: DiT(**SMALL)).double()
    before = model.pos_embed.clone()
    model.load_state_dict(model.state_dict())
    assert model.pos_embed.dtype == torch.float64 and torch.equal(model.pos_embed, before)


def test_layer_arguments_and_repr():
    with pytest.raises(ValueError, match="init: expected 'xavier', 'zeros' or a positive std"):
        Linear(4, 4, init="kaiming")
    with pytest.raises(ValueError, match="eps"):
        FinalLayer(8, 4, eps=-1.0)
    assert repr(RMSNorm(8, eps=1e-5)) == "RMSNorm(8, eps=1e-05)"
