"""DiT building blocks on the fused primitives (flowmap_kernels.ops) and flowmap_kernels.attention.

Every normalisation, modulation, activation, residual and projection goes through ``ops``, so under
torch.func.jvp each runs one fused forward+JVP pass and, in the backward, one fused pass through (y, ty).
Under ``use_backend("naive")`` the same modules run plain PyTorch ops (the reference).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..attention import attention, attention_jvp
from ..integrations.layer_norm_patch import layer_norm as routed_layer_norm
from ..ops.problem import check_eps


def check_size(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers accepted, bools and floats not); ValueError naming
    the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def check_mlp_ratio(mlp_ratio, hidden_size: int) -> int:
    """The MLP width ``int(hidden_size * mlp_ratio)``; ValueError naming mlp_ratio unless it is >= 1."""
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not mlp_ratio > 0 \
            or int(hidden_size * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio: expected a positive number with int(hidden_size * mlp_ratio) >= 1, got "
                         f"{mlp_ratio!r} (hidden_size {hidden_size})")
    return int(hidden_size * mlp_ratio)


def init_weights(model: nn.Module) -> nn.Module:
    """Initialise ``model`` as its constructors do: every submodule's ``reset_parameters``, children before
    their parents (the package's modules also rebuild their computed buffers there). The step after
    ``model.to_empty(device=...)`` for a model built under ``torch.device("meta")``, unless a checkpoint is
    loaded (``load_state_dict`` rebuilds the computed buffers itself). Returns ``model``."""
    def reset(m):
        if callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    return model.apply(reset)


def _rebuild_buffers(module: nn.Module, _incompatible_keys=None) -> None:
    module.reset_buffers()


def rebuild_buffers_on_load(module: nn.Module) -> None:
    """``module.reset_buffers()`` after every ``load_state_dict``: computed (non-persistent) buffers are in no
    checkpoint, and are uninitialised after ``to_empty`` from the meta device."""
    module.register_load_state_dict_post_hook(_rebuild_buffers)


class Linear(nn.Module):
    """nn.Linear through ``ops.linear`` (under forward AD: one product on the stacked [x; tx]).

    init: the weight's initialisation, redone by ``reset_parameters`` (after ``to_empty`` from the meta
    device): "xavier" (uniform), "zeros" (adaLN-Zero projections) or a float std (normal); the bias is zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init="xavier"):
        super().__init__()
        in_features = check_size("in_features", in_features, 0)
        out_features = check_size("out_features", out_features, 0)
        if not (init in ("xavier", "zeros") or (isinstance(init, numbers.Real) and not isinstance(init, bool)
                                                and math.isfinite(init) and init > 0)):
            raise ValueError(f"init: expected 'xavier', 'zeros' or a positive std, got {init!r}")
        self.in_features, self.out_features, self.init = in_features, out_features, init
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)  # drawn for every init, so that seeded models keep their weights
        if self.init == "zeros":
            nn.init.zeros_(self.weight)
        elif self.init != "xavier":
            nn.init.normal_(self.weight, std=self.init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def forward_jvp(self, x, tx):
        """(y, ty) from one product on the stacked [x; tx] (``ops.linear_jvp``; the parameters carry no tangent)."""
        return ops.linear_jvp(x, self.weight, self.bias, tx)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same arguments, parameters, state dict and values) whose forward-mode tangent
    has the right derivative: under forward-mode AD it runs ``ops.layer_norm`` (PyTorch 2.13's F.layer_norm
    gives a loss on the tangent wrong gradients, see ``integrations.patch_layer_norm``), else F.layer_norm."""

    def forward(self, x):
        return routed_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight (``ops.rms_norm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = check_eps(eps)
        self.weight = nn.Parameter(torch.ones(check_size("dim", dim)))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)

    def forward_jvp(self, x, tx):
        return ops.rms_norm_jvp(x, self.weight, tx, eps=self.eps)


class Attention(nn.Module):
    """Multi-head self-attention: qkv projection (ops.linear), optional QK RMSNorm (ops.rms_norm) over the
    head dim, flowmap_kernels.attention, output projection. x (B, N, C) -> (B, N, C)."""

    context_parallel_config = None  # set by flowmap_kernels.distributed.context_parallel: N is a shard

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        dim, num_heads = check_size("dim", dim), check_size("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"num_heads: {num_heads} does not divide dim {dim}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.proj = Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cp = self.context_parallel_config  # set by flowmap_kernels.distributed.context_parallel
        o = attention(q, k, v) if cp is None else cp.attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))

    def forward_jvp(self, x, tx):
        """(y, ty) of :meth:`forward` along tx from the explicit-tangent ops (``fk.attention_jvp``: one fused
        pass for O and tO); no forward-mode AD, so torch.compile keeps the fused kernels."""
        if self.context_parallel_config is not None:
            raise NotImplementedError("Attention.forward_jvp: context parallelism has no dual form; use "
                                      "torch.func.jvp (flowmap_kernels.func.jvp falls back to it)")
        B, N, C = x.shape
        qkv, tqkv = self.qkv.forward_jvp(x, tx)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        tq, tk, tv = tqkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            (q, tq), (k, tk) = self.q_norm.forward_jvp(q, tq), self.k_norm.forward_jvp(k, tk)
        o, to = attention_jvp(q, k, v, tq, tk, tv)
        return self.proj.forward_jvp(o.transpose(1, 2).reshape(B, N, C), to.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) with fc1's bias fused into the activation -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden, bias=False)
        self.fc1_bias = nn.Parameter(torch.zeros(hidden))
        self.fc2 = Linear(hidden, dim)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fc1_bias)

    def forward(self, x):
        return self.fc2(ops.gelu_tanh(self.fc1(x), self.fc1_bias))

    def forward_jvp(self, x, tx):
        h, th = self.fc1.forward_jvp(x, tx)
        return self.fc2.forward_jvp(*ops.gelu_tanh_jvp(h, self.fc1_bias, th))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block. x (B, N, C), c (B, C) conditioning.

    (shift, scale, gate) x 2 = Linear(SiLU(c)); x += gate_a * Attn(mLN(x; shift_a, scale_a));
    x += gate_m * MLP(mLN(x; shift_m, scale_m)), mLN = LayerNorm without affine, x_hat (1 + scale) + shift.
    The modulation projection starts at zero (the block is the identity at initialisation).
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 eps: float = 1e-6):
        super().__init__()
        self.eps = check_eps(eps)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.mlp = Mlp(hidden_size, check_mlp_ratio(mlp_ratio, hidden_size))
        self.adaLN_modulation = Linear(hidden_size, 6 * hidden_size, init="zeros")

    def forward(self, x, c):
        B, C = c.shape
        # (6, B, 1, C) contiguous: each modulation table is a plain (B, 1, C) block (no per-op copies)
        mod = self.adaLN_modulation(F.silu(c)).view(B, 6, 1, C).transpose(0, 1).contiguous()
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.unbind(0)
        x = ops.gated_residual(x, gate_a, self.attn(ops.modulated_layer_norm(x, shift_a, scale_a, self.eps)))
        x = ops.gated_residual(x, gate_m, self.mlp(ops.modulated_layer_norm(x, shift_m, scale_m, self.eps)))
        return x

    def forward_jvp(self, x, c, tx, tc):
        """(y, ty) of :meth:`forward` along (tx, tc): fused modulated LayerNorm, attention, GELU and gated
        residual JVP ops, each one pass for the primal and the tangent."""
        B, C = c.shape
        mod, tmod = self.adaLN_modulation.forward_jvp(*silu_jvp(c, tc))
        mods = mod.view(B, 6, 1, C).transpose(0, 1).contiguous().unbind(0)
        tmods = tmod.view(B, 6, 1, C).transpose(0, 1).contiguous().unbind(0)
        for (shift, scale, gate), (tshift, tscale, tgate), branch in (
                (mods[:3], tmods[:3], self.attn), (mods[3:], tmods[3:], self.mlp)):
            h, th = ops.modulated_layer_norm_jvp(x, shift, scale, tx, tshift, tscale, self.eps)
            h, th = branch.forward_jvp(h, th)
            x, tx = ops.gated_residual_jvp(x, gate, h, tx, tgate, th)
        return x, tx


class FinalLayer(nn.Module):
    """adaLN final layer: mLN(x; shift, scale) -> Linear to patch_size^2 * out_channels (zero-initialised)."""

    def __init__(self, hidden_size: int, out_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = check_eps(eps)
        self.adaLN_modulation = Linear(hidden_size, 2 * hidden_size, init="zeros")
        self.linear = Linear(hidden_size, out_dim, init="zeros")

    def forward(self, x, c):
        B, C = c.shape
        shift, scale = self.adaLN_modulation(F.silu(c)).view(B, 2, 1, C).transpose(0, 1).contiguous().unbind(0)
        return self.linear(ops.modulated_layer_norm(x, shift, scale, self.eps))

    def forward_jvp(self, x, c, tx, tc):
        B, C = c.shape
        mod, tmod = self.adaLN_modulation.forward_jvp(*silu_jvp(c, tc))
        shift, scale = mod.view(B, 2, 1, C).transpose(0, 1).contiguous().unbind(0)
        tshift, tscale = tmod.view(B, 2, 1, C).transpose(0, 1).contiguous().unbind(0)
        return self.linear.forward_jvp(*ops.modulated_layer_norm_jvp(x, shift, scale, tx, tshift, tscale, self.eps))


def silu_jvp(x, tx):
    """(silu(x), tx * silu'(x)) with silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))), PyTorch's own formula."""
    sig = torch.sigmoid(x)
    return F.silu(x), tx * (sig * (1 + x * (1 - sig)))


def _embedding_dtype(t: torch.Tensor) -> torch.dtype:
    """The sinusoids are computed in float32 (float64 for float64 times)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def timestep_embedding_jvp(t: torch.Tensor, tt: torch.Tensor, dim: int, max_period: float = 10000.0,
                           time_scale: float = 1000.0):
    """(emb, temb) of :func:`timestep_embedding` along tt (same shape as t): d cos = -sin * targ, d sin = cos * targ."""
    half = dim // 2
    dt = _embedding_dtype(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / half)
    args = (time_scale * t.to(dt))[:, None] * freqs[None]
    targs = (time_scale * tt.to(dt))[:, None] * freqs[None]
    cos, sin = torch.cos(args), torch.sin(args)
    emb, temb = torch.cat([cos, sin], dim=-1), torch.cat([targs * -sin, targs * cos], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        temb = torch.cat([temb, torch.zeros_like(temb[:, :1])], dim=-1)
    if t.dtype.is_floating_point:
        return emb.to(t.dtype), temb.to(t.dtype)
    return emb, temb


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, time_scale: float = 1000.0):
    """Sinusoidal embedding of float times t (B,) -> (B, dim): [cos(f t'), sin(f t')], t' = time_scale t,
    f_i = max_period^(-i / (dim/2)), computed in float32 (float64 for float64 t). Differentiable in t."""
    half = dim // 2
    dt = _embedding_dtype(t)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / half)
    args = (time_scale * t.to(dt))[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t.dtype) if t.dtype.is_floating_point else emb


class TimestepEmbedder(nn.Module):
    """Float time (B,) -> (B, hidden): sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        check_size("hidden_size", hidden_size)
        self.freq_dim = check_size("freq_dim", freq_dim, 2)  # 0 or 1: no sinusoid, the time would be ignored
        self.fc1 = Linear(freq_dim, hidden_size)
        self.fc2 = Linear(hidden_size, hidden_size)
        for fc in (self.fc1, self.fc2):  # N(0, 0.02^2), drawn after both (the draws of seeded models)
            fc.init = 0.02
            nn.init.normal_(fc.weight, std=0.02)

    def forward(self, t):
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.freq_dim).to(self.fc1.weight.dtype))))

    def forward_jvp(self, t, tt, tangent_dtype: Optional[torch.dtype] = None):
        """(emb, temb) along tt; temb in ``tangent_dtype`` (default the weights' dtype: float32 for the
        float32 tangents of a 16-bit model)."""
        emb, temb = timestep_embedding_jvp(t, tt, self.freq_dim)
        dt = self.fc1.weight.dtype
        return self.fc2.forward_jvp(*silu_jvp(*self.fc1.forward_jvp(emb.to(dt), temb.to(tangent_dtype or dt))))


class LabelTable(nn.Embedding):
    """nn.Embedding whose ``reset_parameters`` draws N(0, 0.02^2) (DiT's label table), in any reset order."""

    dual_passive = True  # read by LabelEmbedder.forward_jvp without a dual form of its own (flowmap_kernels.func)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)  # nn.Embedding's own draw, kept so that seeded models keep their weights
        nn.init.normal_(self.weight, std=0.02)
        self._fill_padding_idx_with_zero()


def check_class_labels(y: Optional[torch.Tensor], batch: int, num_classes: int) -> None:
    """ValueError unless ``y`` is None (the null class) or int64 / int32 labels of shape (batch,)."""
    if y is not None and (not isinstance(y, torch.Tensor) or tuple(y.shape) != (batch,)
                          or y.dtype not in (torch.int32, torch.int64)):
        got = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y: expected int64 (or int32) class labels of shape ({batch},) in [0, {num_classes}] (or "
                         f"None: the null class), got {got}")


class LabelEmbedder(nn.Module):
    """Class label (B,) long -> (B, hidden); label ``num_classes`` (or y=None) is the null class (CFG)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = check_size("num_classes", num_classes, 0)
        self.table = LabelTable(num_classes + 1, hidden_size)

    def forward(self, y: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        check_class_labels(y, batch, self.num_classes)
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.table(y)

    def forward_jvp(self, y: Optional[torch.Tensor], batch: int, device):
        """(embedding, zero tangent): labels are integers and carry no tangent."""
        emb = self.forward(y, batch, device)
        return emb, torch.zeros_like(emb)
