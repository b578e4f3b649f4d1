"""diffusers integration: an attention processor that runs fk.attention, and a flow-map adapter for DiT.

diffusers is an optional dependency (``pip install flowmap_kernels[diffusers]``); it is imported when a
function here is first called, so importing this module never needs it.

``FlowmapAttnProcessor``        drop-in for diffusers' ``AttnProcessor2_0`` on ``Attention`` modules; the
                                attention call is :func:`flowmap_kernels.integrations.scaled_dot_product_attention`
                                (fk.attention, or the original SDPA with a warning for calls it cannot serve).
``set_flowmap_attention(model)`` sets it on every ``Attention`` module whose processor is the plain
                                ``AttnProcessor`` / ``AttnProcessor2_0``; returns how many were set.
``checkpoint_transformer_blocks(model, mode)`` activation checkpointing of the transformer blocks that
                                works under torch.func.jvp (flowmap_kernels.checkpoint; diffusers' own
                                ``enable_gradient_checkpointing`` uses torch's checkpoint, which does not).
``DiffusersFlowMap(transformer)`` wraps a ``DiTTransformer2DModel`` as ``model(x, s, t, y=None) -> V``,
                                the interface of :mod:`flowmap_kernels.methods` (x at the noisier time s,
                                target time t <= s, V the average velocity).
``ContextParallelAttnProcessor``  the processor that ``flowmap_kernels.distributed.context_parallel(flowmap,
                                group)`` sets on a DiffusersFlowMap's attention modules (its tokens sharded
                                over the group: see ``enable_context_parallel`` and docs/scaling.md).

Two times in a one-time DiT: the timestep embedding of the source time s is the DiT's own (timestep
``time_scale * s``, the noise level of x, as the pretrained network reads it); the interval s - t goes
through the same sinusoidal projection and a NEW ``TimestepEmbedding`` MLP whose last layer starts at zero,
and the two embeddings are added in every block's ``norm1.emb`` (and in the output modulation, which reuses
block 0's). At initialisation V(x, s, t) is therefore the wrapped network at timestep s for every t, e.g.
the pretrained DiT's prediction (MeanFlow's (t, t - r) conditioning, in this project's convention).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..nn.layers import check_class_labels
from .layer_norm_patch import set_flowmap_layer_norm
from .sdpa_patch import scaled_dot_product_attention

__all__ = ["FlowmapAttnProcessor", "set_flowmap_attention", "DiffusersFlowMap", "require_diffusers",
           "checkpoint_transformer_blocks", "ContextParallelAttnProcessor"]


def require_diffusers():
    """Import diffusers or raise ImportError saying how to install it."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError(
            "flowmap_kernels.integrations.diffusers needs diffusers: pip install 'flowmap_kernels[diffusers]'"
        ) from e
    return diffusers


class FlowmapAttnProcessor:
    """diffusers attention processor (same call signature and steps as ``AttnProcessor2_0``).

    hidden_states (B, N, C) or (B, C, H, W); returns the same shape. Differences from AttnProcessor2_0:
    the attention runs fk.attention (forward-mode AD, backward through the tangent) and the softmax scale
    is ``attn.scale`` (AttnProcessor2_0 ignores it; they agree whenever ``scale_qk=True``, the default).
    A float mask is cast to the query dtype.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)

        hidden_states = self._attention(attn, query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attention(self, attn, query, key, value, attention_mask):
        """(B, H, Lq, D) queries, (B, H, Lk, D) keys and values -> (B, H, Lq, Dv)."""
        return scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=attn.scale)


class ContextParallelAttnProcessor(FlowmapAttnProcessor):
    """:class:`FlowmapAttnProcessor` whose hidden states are this rank's share of the tokens: the attention
    is :func:`flowmap_kernels.distributed.context_parallel_attention` (ring or Ulysses, as ``config`` says).
    Set by :func:`flowmap_kernels.distributed.context_parallel` on a :class:`DiffusersFlowMap`; self-attention
    without a mask only (the token-sharded sequence is both the queries and the keys)."""

    def __init__(self, config):
        self.config = config  # a flowmap_kernels.distributed.ContextParallelConfig

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        for name, value in (("encoder_hidden_states", encoder_hidden_states), ("attention_mask", attention_mask)):
            if value is not None:
                raise ValueError(f"{name}: ContextParallelAttnProcessor runs self-attention without a mask over "
                                 f"the token shards (no cross-attention, no attention mask)")
        return super().__call__(attn, hidden_states, None, None, temb, *args, **kwargs)

    def _attention(self, attn, query, key, value, attention_mask):
        return self.config.attention(query, key, value, scale=attn.scale)


def set_flowmap_attention(model: nn.Module, *, strict: bool = False) -> int:
    """Set :class:`FlowmapAttnProcessor` on every diffusers ``Attention`` module of ``model``.

    Only modules whose processor is exactly ``AttnProcessor`` or ``AttnProcessor2_0`` are changed (other
    processors add behaviour, e.g. rotary embeddings or IP-adapters, that this one would drop): with
    ``strict=True`` any other processor is a ValueError naming the module, else it is left as it is
    (``patch_sdpa()`` still routes its SDPA calls). Returns the number of processors set.
    """
    require_diffusers()
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    n, skipped = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        if type(module.processor) in (AttnProcessor, AttnProcessor2_0, FlowmapAttnProcessor):
            module.set_processor(FlowmapAttnProcessor())
            n += 1
        else:
            skipped.append(f"{name} ({type(module.processor).__name__})")
    if skipped and strict:
        raise ValueError(f"model: attention processors that FlowmapAttnProcessor cannot replace: {', '.join(skipped)}")
    return n


class _TwoTimeEmbedding(nn.Module):
    """Replaces a ``CombinedTimestepLabelEmbeddings``: timestep (B, 2) = (source timestep, interval)."""

    def __init__(self, inner: nn.Module, interval: nn.Module):
        super().__init__()
        self.inner = inner
        # Shared with the adapter (which registers it); kept out of this module's parameters so that it
        # is counted and saved once. deepcopy of the adapter keeps the sharing (copy memo).
        self.__dict__["interval"] = interval

    def forward(self, timestep, class_labels, hidden_dtype=None):
        if timestep.dim() != 2 or timestep.shape[-1] != 2:
            raise ValueError(
                f"timestep: a DiffusersFlowMap-wrapped DiT takes (batch, 2) = (source, interval) timesteps, "
                f"got shape {tuple(timestep.shape)}; call the DiffusersFlowMap, not the transformer")
        source, interval = timestep.unbind(-1)
        emb = self.inner(source, class_labels, hidden_dtype=hidden_dtype)
        proj = self.inner.time_proj(interval).to(dtype=emb.dtype)
        return emb + self.interval(proj)


class DiffusersFlowMap(nn.Module):
    """A diffusers DiT as a flow map: ``forward(x, s, t, y=None) -> V(x, s, t)``.

    x (B, C, H, W) latents at time s; s, t (B,) or scalars in [0, 1] (t = 0 data, t = 1 noise, s >= t in
    training); y (B,) int class labels or None (the DiT's null class, index ``num_embeds_ada_norm``).
    Returns V (B, C, H, W); with a learned-sigma DiT (out_channels = 2 C) the first C channels.
    The DiT sees timestep ``time_scale * s`` and interval ``time_scale * (s - t)`` (see the module doc).

    ``class_dropout``: the label-dropout probability inside diffusers' label embedding in train mode
    (diffusers builds DiT with 0.1); default 0.0 so that the training method decides about
    classifier-free-guidance dropout. The transformer is modified in place (each block's ``norm1.emb``
    becomes a two-time embedding; its ``nn.LayerNorm`` modules become ``flowmap_kernels.nn.LayerNorm``, the
    same values but an exact derivative of the forward-mode tangent, which PyTorch 2.13's lacks) and becomes a
    submodule of this one.
    """

    def __init__(self, transformer: nn.Module, *, time_scale: float = 1000.0, class_dropout: float = 0.0):
        super().__init__()
        require_diffusers()
        from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings, TimestepEmbedding

        blocks = getattr(transformer, "transformer_blocks", None)
        embs = [getattr(getattr(b, "norm1", None), "emb", None) for b in (blocks or [])]
        if not embs or not all(isinstance(e, (CombinedTimestepLabelEmbeddings, _TwoTimeEmbedding)) for e in embs):
            raise TypeError(
                f"transformer: expected a DiT-style model (e.g. diffusers DiTTransformer2DModel) whose blocks "
                f"condition through norm1.emb = CombinedTimestepLabelEmbeddings, got {type(transformer).__name__}")
        if any(isinstance(e, _TwoTimeEmbedding) for e in embs):
            raise ValueError("transformer: already wrapped by a DiffusersFlowMap")
        if not 0.0 <= class_dropout < 1.0:
            raise ValueError(f"class_dropout: expected a probability in [0, 1), got {class_dropout}")
        first = embs[0]
        dim = first.timestep_embedder.linear_2.out_features
        self.transformer = transformer
        self.time_scale = float(time_scale)
        self.in_channels = int(transformer.config.in_channels)
        self.num_classes = int(first.class_embedder.num_classes)
        self.interval_embedder = TimestepEmbedding(in_channels=first.time_proj.num_channels, time_embed_dim=dim)
        nn.init.zeros_(self.interval_embedder.linear_2.weight)
        nn.init.zeros_(self.interval_embedder.linear_2.bias)
        self.interval_embedder.to(device=first.timestep_embedder.linear_2.weight.device,
                                  dtype=first.timestep_embedder.linear_2.weight.dtype)
        for block, emb in zip(blocks, embs):
            emb.class_embedder.dropout_prob = class_dropout
            block.norm1.emb = _TwoTimeEmbedding(emb, self.interval_embedder)
        set_flowmap_layer_norm(transformer)  # (a loss on the tangent needs the exact LayerNorm, see above)

    def _check_call(self, x, s, t, y) -> tuple:
        """The argument checks of :meth:`forward`; returns what the ranks of a context-parallel group must agree on."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected (batch, {self.in_channels}, height, width), got {got}")
        B = x.shape[0]
        shapes = []
        for name, v in (("s", s), ("t", t)):
            shape = tuple(torch.as_tensor(v).shape) if not isinstance(v, torch.Tensor) else tuple(v.shape)
            if len(shape) > 1 or len(shape) == 1 and shape[0] not in (1, B):
                raise ValueError(f"{name}: expected a scalar or a tensor of shape ({B},), got shape {shape}")
            shapes.append(shape)
        check_class_labels(y, B, self.num_classes)
        return tuple(x.shape), str(x.dtype), *shapes, None if y is None else str(y.dtype)

    def forward(self, x: torch.Tensor, s, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        cp = self.__dict__.get("_context_parallel")
        if cp is None:
            self._check_call(x, s, t, y)
        else:  # (a bad argument on one rank raises on every rank: none waits in the blocks' collectives)
            cp.agree("DiffusersFlowMap", lambda: self._check_call(x, s, t, y), x)
        B = x.shape[0]
        # times in float32 at least: 1000 * s in bfloat16 keeps 3 significant digits
        tdtype = torch.promote_types(x.dtype, torch.float32)
        s, t = (torch.as_tensor(v, device=x.device).to(tdtype).expand(B) for v in (s, t))
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        timestep = torch.stack((s, s - t), dim=-1) * self.time_scale
        out = self.transformer(x, timestep=timestep, class_labels=y, return_dict=False)[0]
        return out[:, : self.in_channels]


# ------------------------------------------------------------------------------- context parallelism

def _per_token_types() -> tuple:
    """Module types that act on each token separately (or only on the conditioning): everything a DiT's
    token path may hold between the patch embedding and the output projection under context parallelism,
    where tokens meet only in attention."""
    from diffusers.models.activations import GEGLU, GELU, ApproximateGELU
    from diffusers.models.attention import BasicTransformerBlock, FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import (CombinedTimestepLabelEmbeddings, LabelEmbedding, TimestepEmbedding,
                                             Timesteps)
    from diffusers.models.normalization import AdaLayerNormZero, RMSNorm

    return (nn.Linear, nn.LayerNorm, nn.Dropout, nn.SiLU, nn.GELU, nn.Identity, nn.ModuleList, nn.Embedding,
            BasicTransformerBlock, FeedForward, GELU, GEGLU, ApproximateGELU, Attention, AdaLayerNormZero, RMSNorm,
            CombinedTimestepLabelEmbeddings, TimestepEmbedding, Timesteps, LabelEmbedding, _TwoTimeEmbedding)


def check_context_parallel(flowmap: "DiffusersFlowMap", world: int, mode: str) -> None:
    """Raise (naming the module) if :func:`enable_context_parallel` cannot run ``flowmap`` exactly on ``world``
    ranks: the transformer must be a ``DiTTransformer2DModel`` whose modules between the patch embedding and
    the output projection act per token (attention aside), its attention modules self-attention with a plain
    processor (for ``mode="ulysses"`` with heads divisible by ``world``)."""
    from diffusers import DiTTransformer2DModel
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    transformer = flowmap.transformer
    if type(transformer) is not DiTTransformer2DModel:
        raise TypeError(f"model: context parallelism of a DiffusersFlowMap supports a wrapped diffusers "
                        f"DiTTransformer2DModel, got {type(transformer).__name__}")
    if getattr(flowmap, "_context_parallel", None) is not None:
        raise ValueError("model: this DiffusersFlowMap is already context-parallel; remove() the handle of the "
                         "first context_parallel call before switching again")
    allowed = _per_token_types()
    for name, module in transformer.named_modules(prefix="transformer"):
        if name == "transformer" or name.startswith("transformer.pos_embed"):
            continue  # the patch (+ position) embedding runs on the full input, before the tokens are split
        if not isinstance(module, allowed):
            raise ValueError(
                f"model: {name} ({type(module).__name__}) is not known to act on each token separately; context "
                f"parallelism splits the tokens over the ranks and lets only attention mix them")
        if not isinstance(module, Attention):
            continue
        if module.is_cross_attention:
            raise ValueError(f"model: {name} is cross-attention; context parallelism supports self-attention only")
        if type(module.processor) not in (AttnProcessor, AttnProcessor2_0, FlowmapAttnProcessor):
            raise ValueError(f"model: {name} has attention processor {type(module.processor).__name__}; context "
                             f"parallelism replaces AttnProcessor, AttnProcessor2_0 and FlowmapAttnProcessor only")
        if module.group_norm is not None or module.spatial_norm is not None:
            raise ValueError(f"model: {name} normalises over the tokens (group_norm / spatial_norm); context "
                             f"parallelism needs per-token layers outside attention")
        if mode == "ulysses" and module.heads % world:
            raise ValueError(f"mode: 'ulysses' needs the heads of {name} ({module.heads}) divisible by the group "
                             f"size ({world}); use mode='ring'")


def enable_context_parallel(flowmap: "DiffusersFlowMap", config) -> Callable[[], None]:
    """Run ``flowmap``'s transformer with its tokens sharded as ``config`` (a
    :class:`flowmap_kernels.distributed.ContextParallelConfig`) says: the patch embedding's output is split
    (``config.shard``), every attention processor becomes a :class:`ContextParallelAttnProcessor`, and the
    output projection's per-token result is gathered (``config.gather``) before diffusers' unpatchify.
    Check first with :func:`check_context_parallel`. Returns the function that undoes it. Used through
    :func:`flowmap_kernels.distributed.context_parallel`."""
    from diffusers.models.attention_processor import Attention

    transformer = flowmap.transformer
    hooks = [transformer.pos_embed.register_forward_hook(lambda m, a, out: config.shard(out)),
             transformer.proj_out_2.register_forward_hook(lambda m, a, out: config.gather(out))]
    processors = [(m, m.processor) for m in transformer.modules() if isinstance(m, Attention)]
    for module, _ in processors:
        module.set_processor(ContextParallelAttnProcessor(config))
    flowmap.__dict__["_context_parallel"] = config

    def undo():
        for h in hooks:
            h.remove()
        for module, processor in processors:
            module.set_processor(processor)
        flowmap.__dict__.pop("_context_parallel", None)
    return undo


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def checkpoint_transformer_blocks(model: nn.Module, mode: str = "blocks", policy=None) -> int:
    """Route every block of a diffusers transformer through :func:`flowmap_kernels.checkpoint`.

    model: a diffusers transformer, or a module holding one (e.g. a :class:`DiffusersFlowMap`); the blocks
    are the entries of its ``transformer_blocks`` and ``single_transformer_blocks`` lists. mode / policy:
    as :func:`flowmap_kernels.apply_activation_checkpointing` ("blocks", "selective", "none"). The
    recomputation runs in the backward: keep ``patch_sdpa`` (if the attention relies on it) active
    there too, or use :func:`set_flowmap_attention`. Returns the number of blocks.
    """
    from ..activation_checkpoint import apply_activation_checkpointing

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    blocks = [b for m in model.modules() for name in BLOCK_LISTS
              if isinstance(getattr(m, name, None), nn.ModuleList) for b in getattr(m, name)]
    if not blocks:
        raise ValueError(f"model: {type(model).__name__} has no {' or '.join(BLOCK_LISTS)} (not a diffusers "
                         "transformer?); use flowmap_kernels.apply_activation_checkpointing(model, blocks=...)")
    apply_activation_checkpointing(model, mode, blocks=blocks, policy=policy)
    return len(blocks)
