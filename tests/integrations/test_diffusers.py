"""diffusers: DiT under torch.func.jvp with the patch or the processor, against SDPA's math backend."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional dependency (pip install diffusers)")

from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention, AttnAddedKVProcessor, AttnProcessor, AttnProcessor2_0,
)

from flowmap_kernels.integrations import SDPAFallbackWarning, fallback_counts, patch_sdpa, reset_fallbacks  # noqa: E402
from flowmap_kernels.integrations.diffusers import (  # noqa: E402
    DiffusersFlowMap, FlowmapAttnProcessor, set_flowmap_attention,
)
from tests.integrations.helpers import errors, jvp_and_param_grads, patched_and_reference  # noqa: E402
from tests.numerics import rel_err  # noqa: E402
from tests.reference import random_parameters_, with_mean_var_layer_norms_  # noqa: E402


def small_dit(seed=0, learn_sigma=True):
    """A 2-layer DiT with random weights: 8x8 latents of 4 channels, patch 2 (16 tokens), 2 heads of 12."""
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8 if learn_sigma else 4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()


def dit_inputs(B=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    tx = torch.randn(B, 4, 8, 8, generator=g)
    timestep = torch.tensor([250.0, 730.0][:B])
    labels = torch.tensor([3, 7][:B])
    return x, tx, timestep, labels


def _dit_fn(model, timestep, labels):
    return lambda x: model(x, timestep=timestep, class_labels=labels, return_dict=False)[0]


def test_unpatched_dit_jvp_raises_not_implemented():
    model = small_dit()
    x, tx, ts, y = dit_inputs()
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(_dit_fn(model, ts, y), (x,), (tx,))


@pytest.mark.parametrize("route", ["patch_sdpa", "processor"])
def test_dit_jvp_and_tangent_loss_gradients_match_sdpa_math(route):
    model = small_dit()
    x, tx, ts, y = dit_inputs()
    fn, params = _dit_fn(model, ts, y), list(model.parameters())
    ref = jvp_and_param_grads(fn, params, (x,), (tx,), math_backend=True)
    reset_fallbacks()
    if route == "patch_sdpa":
        with patch_sdpa():
            got = jvp_and_param_grads(fn, params, (x,), (tx,))
    else:
        assert set_flowmap_attention(model) == 2
        got = jvp_and_param_grads(fn, params, (x,), (tx,))
    err = errors(got, ref)
    assert max(err.values()) < 1e-5, err
    assert fallback_counts() == {}


def _attention_module(cross: bool, processor):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=10 if cross else None, heads=2, dim_head=8, bias=True,
                     residual_connection=True, rescale_output_factor=2.0)
    attn.set_processor(processor)
    return attn.double()


@pytest.mark.parametrize("cross,mask", [(False, None), (True, "float"), (True, "bool"), (False, "image")])
def test_processor_matches_attn_processor_2_0(cross, mask):
    """Self/cross attention, float and bool masks (diffusers' (B, Lk) mask), 4-d image input."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 16, 3, 5, generator=g, dtype=torch.float64) if mask == "image" else \
        torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    enc = torch.randn(2, 9, 10, generator=g, dtype=torch.float64) if cross else None
    am = None
    if mask == "float":
        am = torch.randn(2, 1, 9, generator=g, dtype=torch.float64)
    elif mask == "bool":
        am = torch.rand(2, 1, 9, generator=g) > 0.4
        am[:, :, 0] = True
    want = _attention_module(cross, AttnProcessor2_0())(h, encoder_hidden_states=enc, attention_mask=am)
    got = _attention_module(cross, FlowmapAttnProcessor())(h, encoder_hidden_states=enc, attention_mask=am)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-12


def test_set_flowmap_attention_only_replaces_plain_processors():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "a": Attention(query_dim=16, heads=2, dim_head=8, processor=AttnProcessor()),
        "b": Attention(query_dim=16, heads=2, dim_head=8, processor=AttnProcessor2_0()),
        "c": Attention(query_dim=16, heads=2, dim_head=8, added_kv_proj_dim=8, processor=AttnAddedKVProcessor()),
    })
    with pytest.raises(ValueError, match=r"c \(AttnAddedKVProcessor\)"):
        set_flowmap_attention(model, strict=True)
    assert set_flowmap_attention(model) == 2
    assert isinstance(model["a"].processor, FlowmapAttnProcessor)
    assert isinstance(model["c"].processor, AttnAddedKVProcessor)
    with pytest.raises(TypeError, match="model"):
        set_flowmap_attention("not a model")


# ------------------------------------------------------------------------------------ DiffusersFlowMap

def test_flowmap_adapter_starts_as_the_dit_at_the_source_time():
    """Zero-initialised interval embedding: V(x, s, t) = DiT(x, 1000 s, y)[:, :C] for every t."""
    dit = small_dit()
    ref_dit = copy.deepcopy(dit)
    fm = DiffusersFlowMap(dit)
    x, _, _, y = dit_inputs()
    s = torch.tensor([0.9, 0.4])
    want = ref_dit(x, timestep=1000 * s, class_labels=y, return_dict=False)[0][:, :4]
    for t in (s, torch.tensor([0.1, 0.0]), 0.0):
        assert torch.allclose(fm(x, s, t, y), want, atol=1e-6, rtol=1e-5)
    null = ref_dit(x, timestep=1000 * s, class_labels=torch.tensor([10, 10]), return_dict=False)[0][:, :4]
    assert torch.allclose(fm(x, s, s, None), null, atol=1e-6, rtol=1e-5)


def test_flowmap_adapter_interval_embedding_is_trainable_and_used():
    fm = DiffusersFlowMap(small_dit(learn_sigma=False))
    x, _, _, y = dit_inputs()
    s, t = torch.tensor([0.9, 0.4]), torch.tensor([0.2, 0.1])
    with patch_sdpa():
        loss = fm(x, s, t, y).square().mean()
    loss.backward()
    assert fm.interval_embedder.linear_2.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fm.interval_embedder.linear_2.weight.normal_()  # the bias alone adds a constant for every t
    assert not torch.allclose(fm(x, s, t, y), fm(x, s, s, y))


def test_flowmap_adapter_loss_on_the_tangent_has_exact_layer_norm_gradients():
    """The adapter's LayerNorms are fk.nn.LayerNorm: the parameter gradients of a loss on the tangent (TVM's
    kind) match the same model with LayerNorm written from mean / var ops, in float64 (with eager
    nn.LayerNorm they differ by ~4e-2 in PyTorch 2.13)."""
    fm = random_parameters_(DiffusersFlowMap(small_dit()).double(), 3, std=0.3)
    assert not any(type(m) is torch.nn.LayerNorm for m in fm.modules())
    ref = with_mean_var_layer_norms_(copy.deepcopy(fm))
    x, tx, _, y = dit_inputs()
    s, t = torch.tensor([0.9, 0.4], dtype=torch.float64), torch.tensor([0.3, 0.4], dtype=torch.float64)
    grads = []
    for model in (fm, ref):
        with patch_sdpa():
            _, tout = torch.func.jvp(lambda a, b, c: model(a, b, c, y), (x.double(), s, t),
                                     (tx.double(), torch.ones_like(s), torch.zeros_like(t)))
            grads.append(torch.autograd.grad(tout.square().sum(), list(model.parameters()), allow_unused=True,
                                             materialize_grads=True))
    flat = [torch.cat([g.flatten() for g in gs]) for gs in grads]  # (the key biases' exact gradient is 0)
    assert rel_err(*flat) < 1e-12


def test_flowmap_adapter_jvp_matches_sdpa_math():
    """The MeanFlow-style call: tangent (dx, ds, dt) through x and both times, plus gradients of a loss
    on the tangent, with the patch against SDPA's math backend."""
    fm = DiffusersFlowMap(small_dit())
    with torch.no_grad():  # a non-trivial interval embedding
        fm.interval_embedder.linear_2.weight.normal_(0, 0.02)
    x, tx, _, y = dit_inputs()
    s, t = torch.tensor([0.9, 0.4]), torch.tensor([0.3, 0.4])
    fn = lambda a, b, c: fm(a, b, c, y)  # noqa: E731
    primals, tangents = (x, s, t), (tx, torch.ones(2), torch.zeros(2))
    params = list(fm.parameters())
    err = errors(*patched_and_reference(fn, params, primals, tangents))
    assert max(err.values()) < 1e-5, err


def test_flowmap_adapter_low_precision_keeps_float32_times():
    fm = DiffusersFlowMap(small_dit()).to(torch.bfloat16)
    seen = []
    fm.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    x, _, _, y = dit_inputs()
    out = fm(x.bfloat16(), torch.tensor([0.123456, 0.5], dtype=torch.bfloat16), 0.0, y)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 8, 8)
    assert seen[0].dtype == torch.float32
    assert seen[0][1].tolist() == [500.0, 500.0]


def test_flowmap_adapter_deepcopy_keeps_one_interval_embedder():
    fm = DiffusersFlowMap(small_dit())
    ema = copy.deepcopy(fm)
    assert ema.transformer.transformer_blocks[1].norm1.emb.interval is ema.interval_embedder
    assert ema.interval_embedder is not fm.interval_embedder
    n_interval = sum(p.numel() for p in fm.interval_embedder.parameters())
    n_dit = sum(p.numel() for p in small_dit().parameters())
    assert sum(p.numel() for p in fm.parameters()) == n_dit + n_interval


def test_flowmap_adapter_bad_input():
    with pytest.raises(TypeError, match="transformer"):
        DiffusersFlowMap(torch.nn.Linear(2, 2))
    dit = small_dit()
    fm = DiffusersFlowMap(dit)
    with pytest.raises(ValueError, match="already wrapped"):
        DiffusersFlowMap(dit)
    x, _, ts, y = dit_inputs()
    with pytest.raises(ValueError, match="x:"):
        fm(x[0], 0.5, 0.2)
    with pytest.raises(ValueError, match="y:"):
        fm(x, 0.5, 0.2, torch.tensor([1]))
    with pytest.raises(ValueError, match="timestep"):  # the wrapped transformer called directly
        dit(x, timestep=ts, class_labels=y)
    with pytest.raises(ValueError, match="class_dropout"):
        DiffusersFlowMap(small_dit(), class_dropout=1.5)


_LABELS = "y: expected int64 (or int32) class labels of shape (2,) in [0, 10] (or None: the null class)"


@pytest.mark.parametrize("s, t, y, message", [
    (torch.rand(2, 1), 0.0, None, "s: expected a scalar or a tensor of shape (2,), got shape (2, 1)"),
    (0.5, torch.rand(3), None, "t: expected a scalar or a tensor of shape (2,), got shape (3,)"),
    (0.5, 0.2, torch.tensor([1.0, 2.0]), f"{_LABELS}, got torch.float32"),
    (0.5, 0.2, [1, 2], f"{_LABELS}, got list"),
])
def test_flowmap_adapter_bad_times_and_labels_name_the_argument(s, t, y, message):
    """Checked before the transformer runs (torch's expand / embedding errors named neither)."""
    fm = DiffusersFlowMap(small_dit())
    x, _, _, _ = dit_inputs()
    with pytest.raises(ValueError, match=re.escape(message)):
        fm(x, s, t, y)
    assert fm(x, torch.tensor([0.5]), torch.tensor(0.2), torch.tensor([1, 2], dtype=torch.int32)).shape == x.shape


def test_flowmap_adapter_trains_with_a_method_loss():
    """The docs example: a method loss from flowmap_kernels.methods (MeanFlow: J + B) on the adapter."""
    from flowmap_kernels import methods
    fm = DiffusersFlowMap(small_dit()).train()
    x0, _, _, y = dit_inputs()
    torch.manual_seed(0)
    with patch_sdpa(), warnings.catch_warnings():
        warnings.simplefilter("error", SDPAFallbackWarning)
        loss, logs = methods.METHODS["meanflow"].loss(fm, x0, cond=y)
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fm.parameters() if p.requires_grad)


def _third_party(name):
    """Tiny diffusers models with random weights (float64) and a function of their latent input: Flux (joint +
    single-stream blocks, RoPE, the attention dispatcher), SD3 (joint attention), a UNet2DCondition
    (cross-attention with an encoder mask), PixArt (masked cross-attention), Wan 2.1 (3-D latents, RoPE),
    CogVideoX and Sana."""
    import diffusers
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    enc, pooled, ts = rand(1, 5, 16), rand(1, 8), torch.tensor([0.5], dtype=torch.float64)
    enc_mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    if name == "flux":
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        img_ids = torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], -1).double()
        x = rand(1, 16, 4)
        call = lambda a: m(hidden_states=a, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts,  # noqa: E731
                           img_ids=img_ids, txt_ids=torch.zeros(5, 3, dtype=torch.float64), return_dict=False)[0]
    elif name == "sd3":
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                            caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                            pos_embed_max_size=8)
        x = rand(1, 4, 8, 8)
        call = lambda a: m(hidden_states=a, encoder_hidden_states=enc, pooled_projections=pooled, timestep=ts,  # noqa: E731
                           return_dict=False)[0]
    elif name == "unet":
        m = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
        x = rand(1, 4, 8, 8)
        call = lambda a: m(a, 10 * ts, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,  # noqa: E731
                           return_dict=False)[0]
    elif name == "pixart":
        m = diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
            cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, use_additional_conditions=False)
        x = rand(1, 4, 8, 8)
        call = lambda a: m(a, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, timestep=10 * ts,  # noqa: E731
                           return_dict=False)[0]
    elif name == "wan":
        m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                            in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                            num_layers=1, rope_max_seq_len=32)
        x = rand(1, 4, 2, 4, 4)
        call = lambda a: m(a, timestep=10 * ts, encoder_hidden_states=enc, return_dict=False)[0]  # noqa: E731
    elif name == "cogvideox":
        m = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=5)
        x = rand(1, 2, 4, 4, 4)
        call = lambda a: m(a, encoder_hidden_states=enc, timestep=torch.tensor([10]), return_dict=False)[0]  # noqa: E731
    else:
        assert name == "sana"
        m = diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
            num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
            sample_size=8, patch_size=1)
        x = rand(1, 4, 8, 8)
        call = lambda a: m(a, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, timestep=10 * ts,  # noqa: E731
                           return_dict=False)[0]
    random_parameters_(m.double(), g, 0.2)
    return m, call, x, torch.randn(x.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["flux", "sd3", "unet", "pixart", "wan", "cogvideox", "sana"])
def test_third_party_models_under_the_patch_match_sdpa_math(name):
    """Third-party models whose attention goes through diffusers' processors and attention dispatcher: under
    patch_sdpa, torch.func.jvp and the gradients of a loss on the tangent equal SDPA's math backend (float64)."""
    model, fn, x, tx = _third_party(name)
    params = list(model.parameters())
    err = errors(*patched_and_reference(fn, params, (x,), (tx,)))
    assert max(err.values()) < 1e-12, err
