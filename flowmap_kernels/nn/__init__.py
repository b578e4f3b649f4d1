"""DiT modules on the fused JVP primitives: Attention, DiTBlock, DiT (two flow-map times s, t); LayerNorm (a
drop-in torch.nn.LayerNorm with an exact derivative of its tangent)."""
from .dit import DiT, dit_tiny, sincos_pos_embed_2d
from .layers import (Attention, DiTBlock, FinalLayer, LabelEmbedder, LayerNorm, Linear, Mlp, RMSNorm,
                     TimestepEmbedder, init_weights, timestep_embedding)

__all__ = ["Attention", "DiTBlock", "DiT", "dit_tiny", "FinalLayer", "LabelEmbedder", "LayerNorm", "Linear", "Mlp",
           "RMSNorm",
           "TimestepEmbedder", "timestep_embedding", "sincos_pos_embed_2d", "init_weights"]
