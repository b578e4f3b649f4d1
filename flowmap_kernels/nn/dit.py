"""A small DiT for images predicting the flow map's average velocity V(x_s, s, t).

Convention (project-wide): t=0 data, t=1 noise, F(x_s, s, t) = x_s + (t - s) V(x_s, s, t).
``model(x, s, t, y=None)``: x (B, C, H, W), s and t (B,) floats, y (B,) long class labels or None (the null
class, for classifier-free guidance) -> V (B, out_channels, H, W). Patchify by a linear map of p x p patches,
fixed 2-D sin-cos position embeddings, conditioning c = emb_s(s) + emb_t(t) + emb_y(y), adaLN-Zero blocks,
final adaLN layer, unpatchify.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import (DiTBlock, FinalLayer, LabelEmbedder, Linear, TimestepEmbedder, check_class_labels,
                     check_mlp_ratio, check_size, rebuild_buffers_on_load)


def sincos_pos_embed_2d(dim: int, grid: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), float32 (computed in float64), on ``device`` (default:
    torch's current default device, so that a model built under ``torch.device("meta")`` allocates nothing)."""
    if dim % 4:
        raise ValueError(f"hidden_size: must be a multiple of 4 for 2-D sin-cos embeddings, got {dim}")

    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    axis = torch.arange(grid, dtype=torch.float64, device=device)
    gh, gw = torch.meshgrid(axis, axis, indexing="ij")
    return torch.cat([one(dim // 2, gh), one(dim // 2, gw)], dim=1).float()


class DiT(nn.Module):
    """DiT with two time inputs (s, t). See the module docstring for the signature."""

    context_parallel_config = None  # set by flowmap_kernels.distributed.context_parallel

    def __init__(self, input_size: int = 8, patch_size: int = 2, in_channels: int = 1, hidden_size: int = 64,
                 depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10,
                 out_channels: Optional[int] = None, qk_norm: bool = False, freq_dim: int = 64,
                 checkpoint_blocks=False, guidance_dim: int = 0, aux_velocity: bool = False):
        """checkpoint_blocks: activation checkpointing of each block (flowmap_kernels.checkpoint, works
        under forward-mode AD): False, True / "blocks" (recompute whole blocks), "selective" (keep the
        attention kernels' outputs) or a policy (ops to keep, see apply_activation_checkpointing).
        guidance_dim: 1 adds the guidance scale omega as an input, ``model(..., w=omega)`` (B,), embedded
        like a time from log(omega) and added to the conditioning (iMF arXiv:2512.02012, TVM
        arXiv:2511.19797); w=None is omega = 1. 0 (default): no such input, the model unchanged.
        aux_velocity: a second adaLN final layer (zero-initialised) on the same last hidden state, an auxiliary
        velocity head (iMF's, arXiv:2512.02012): ``model(..., aux=True)`` returns (V, v_aux). False (default):
        no such head, the model unchanged."""
        super().__init__()
        for name, value, minimum in (("input_size", input_size, 1), ("patch_size", patch_size, 1),
                                     ("in_channels", in_channels, 1), ("hidden_size", hidden_size, 1),
                                     ("depth", depth, 0), ("num_heads", num_heads, 1), ("num_classes", num_classes, 0),
                                     ("freq_dim", freq_dim, 2)):
            check_size(name, value, minimum)
        if out_channels is not None:
            check_size("out_channels", out_channels)
        if hidden_size % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide hidden_size {hidden_size}")
        check_mlp_ratio(mlp_ratio, hidden_size)
        if input_size % patch_size:
            raise ValueError(f"patch_size: {patch_size} does not divide input_size {input_size}")
        self.input_size, self.patch_size = input_size, patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.grid = input_size // patch_size
        self.x_embedder = Linear(in_channels * patch_size * patch_size, hidden_size)
        self.s_embedder = TimestepEmbedder(hidden_size, freq_dim)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        rebuild_buffers_on_load(self)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        if guidance_dim not in (0, 1):
            raise ValueError(f"guidance_dim: the DiT takes 0 or 1 (the guidance scale), got {guidance_dim!r}")
        self.guidance_dim = guidance_dim
        # created last: a DiT without guidance input draws the same initial weights as before
        self.w_embedder = TimestepEmbedder(hidden_size, freq_dim) if guidance_dim else None
        self.aux_velocity = bool(aux_velocity)
        self.aux_final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels) \
            if aux_velocity else None
        if checkpoint_blocks is not False:
            from ..activation_checkpoint import checkpoint_mode_and_policy, apply_activation_checkpointing
            mode, policy = checkpoint_mode_and_policy(checkpoint_blocks)
            apply_activation_checkpointing(self, mode, policy=policy)

    def reset_buffers(self) -> None:
        """Rebuild ``pos_embed`` on its device, in its dtype (also run by ``load_state_dict``)."""
        pe = self.pos_embed
        if pe.device.type != "meta":
            with torch.no_grad():
                pe.copy_(sincos_pos_embed_2d(pe.shape[-1], self.grid, device=pe.device)[None])

    def reset_parameters(self) -> None:
        """The DiT's own state (its computed buffer); :func:`init_weights` resets the whole model."""
        self.reset_buffers()

    def patchify(self, x):
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x):
        B = x.shape[0]
        p, g, C = self.patch_size, self.grid, self.out_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def _check_input(self, x) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected (B, {', '.join(map(str, want))}), got {tuple(x.shape)}")

    def _guidance(self, w, B, like):
        """log(omega) (B,) for the guidance embedder (w=None: omega = 1); None without one (w checked by
        :meth:`_check_call`)."""
        if self.w_embedder is None:
            return None
        if w is None:
            return torch.zeros(B, dtype=like.dtype, device=like.device)
        w = torch.as_tensor(w, dtype=like.dtype, device=like.device).reshape(-1).expand(B)
        return torch.log(w)

    def _check_call(self, x, s, t, y, w, aux) -> tuple:
        """The argument checks of :meth:`forward`, before any work; returns what the ranks of a context-parallel
        group must agree on (shapes, dtypes, which optional inputs are given)."""
        self._check_input(x)
        if aux and self.aux_final_layer is None:
            raise ValueError("aux: this DiT has no auxiliary velocity head (build it with aux_velocity=True)")
        B = x.shape[0]
        for name, v in (("s", s), ("t", t)):
            if not isinstance(v, torch.Tensor) or v.shape != (B,):
                raise ValueError(f"{name}: expected a float tensor of shape ({B},), got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if self.y_embedder is not None:
            check_class_labels(y, B, self.y_embedder.num_classes)
        elif y is not None:
            raise ValueError("y: this DiT has num_classes=0 (unconditional)")
        if self.w_embedder is None and w is not None:
            raise ValueError("w: this DiT has no guidance input (build it with guidance_dim=1)")
        return (tuple(x.shape), str(x.dtype), str(s.dtype), str(t.dtype), None if y is None else str(y.dtype),
                w is None, bool(aux))

    def forward(self, x, s, t, y: Optional[torch.Tensor] = None, w: Optional[torch.Tensor] = None,
                aux: bool = False):
        """V(x, s, t); with ``aux=True`` (a DiT built with aux_velocity) the pair (V, v_aux)."""
        cp = self.context_parallel_config
        if cp is None:
            self._check_call(x, s, t, y, w, aux)
        else:  # (a bad argument on one rank raises on every rank: none waits in the blocks' collectives)
            cp.agree("DiT", lambda: self._check_call(x, s, t, y, w, aux), x)
        B = x.shape[0]
        h = self.x_embedder(self.patchify(x)) + self.pos_embed.to(x.dtype)
        if cp is not None:  # context parallelism: this rank's share of the tokens through the blocks
            h = cp.shard(h)
        c = self.s_embedder(s) + self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, B, x.device)
        lw = self._guidance(w, B, s)
        if lw is not None:
            c = c + self.w_embedder(lw)
        for block in self.blocks:
            h = block(h, c)
        heads = (self.final_layer, self.aux_final_layer) if aux else (self.final_layer,)
        outs = []
        for head in heads:
            o = head(h, c)
            if cp is not None:  # gathered after the per-token final layer: p*p*out_channels values per token, not C
                o = cp.gather(o)
            outs.append(self.unpatchify(o))
        return tuple(outs) if aux else outs[0]


    def forward_jvp(self, x, s, t, tx, ts, tt, y: Optional[torch.Tensor] = None, w: Optional[torch.Tensor] = None):
        """(V, tV): :meth:`forward` and its derivative along (tx, ts, tt) (shapes of x, s, t), built from the
        explicit-tangent ops (one fused pass per op for the primal and the tangent, no forward-mode AD), so it
        runs inside torch.compile with the fused kernels. ``flowmap_kernels.func.jvp(bind(model, y=y), ...)``
        calls it; that falls back to torch.func.jvp for models with hooks (FSDP2), activation checkpointing
        or context parallelism, which this method does not reproduce."""
        self._check_call(x, s, t, y, w, False)
        B = x.shape[0]
        for name, v, ref in (("tx", tx, x), ("ts", ts, s), ("tt", tt, t)):
            if not isinstance(v, torch.Tensor) or v.shape != ref.shape:
                raise ValueError(f"{name}: expected a float tensor of shape {tuple(ref.shape)}, got "
                                 f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        if self.context_parallel_config is not None:
            raise NotImplementedError("DiT.forward_jvp: context parallelism has no dual form; use torch.func.jvp")
        h, th = self.x_embedder.forward_jvp(self.patchify(x), self.patchify(tx))
        h = h + self.pos_embed.to(x.dtype)
        # the tangents' dtype is tx's: x's, or float32 for a 16-bit model (flowmap_kernels.func.jvp tangent_dtype)
        (cs, tcs), (ct, tct) = (self.s_embedder.forward_jvp(s, ts, tx.dtype),
                                self.t_embedder.forward_jvp(t, tt, tx.dtype))
        c, tc = cs + ct, tcs + tct
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, B, x.device)  # labels: no tangent
        lw = self._guidance(w, B, s)
        if lw is not None:
            c = c + self.w_embedder(lw)  # the guidance scale: no tangent
        for block in self.blocks:
            h, th = block.forward_jvp(h, c, th, tc)
        out, tout = self.final_layer.forward_jvp(h, c, th, tc)
        return self.unpatchify(out), self.unpatchify(tout)


def dit_tiny(**kw) -> DiT:
    """8x8 single-channel digits: patch 2 (16 tokens), hidden 64, depth 2, 4 heads, 10 classes."""
    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    return DiT(**cfg)
