"""Small flow-map networks: V(x, s, t) = the average velocity from time s to time t.

``MLPFlowMap`` flattens any per-sample shape (2D points, 8x8 digits) and runs an MLP with SiLU on
[x, emb(s), emb(t - s)] (and optional label and guidance embeddings). Times enter through sinusoidal
features, so the network is smooth in s and t, which JVP-based losses (tangent along s or t) need.
Project convention: see flowmap_kernels.methods.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn
from .nn.layers import rebuild_buffers_on_load

__all__ = ["TimeEmbedding", "MLPFlowMap", "GuidanceEmbedding", "TimeWeight", "TrigFlowParam"]


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, dim): [sin(w_k t), cos(w_k t)] with w_k geometric in [1, max_freq], then a linear."""

    def __init__(self, dim: int = 64, max_freq: float = 32.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: must be even, got {dim}")
        self.max_freq = float(max_freq)
        self.register_buffer("freqs", self._freqs(dim // 2), persistent=False)
        rebuild_buffers_on_load(self)
        self.proj = nn.Linear(dim, dim)

    def _freqs(self, n: int, device=None) -> torch.Tensor:
        return torch.exp(torch.linspace(0.0, math.log(self.max_freq), n, device=device))

    def reset_buffers(self) -> None:
        """Rebuild ``freqs`` on its device, in its dtype (also run by ``load_state_dict``)."""
        if self.freqs.device.type != "meta":
            with torch.no_grad():
                self.freqs.copy_(self._freqs(self.freqs.shape[0], self.freqs.device))

    def reset_parameters(self) -> None:
        self.reset_buffers()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = t[:, None].to(self.freqs.dtype) * self.freqs
        # features in the layer's dtype (bf16 weights under FSDP2 mixed precision; a no-op otherwise)
        return self.proj(torch.cat([torch.sin(a), torch.cos(a)], 1).to(self.proj.weight.dtype))


class GuidanceEmbedding(nn.Module):
    """Guidance conditioning w (B,) or (B, k) -> (B, dim): features [log omega, t_min, t_max][:k] (the
    guidance scale omega > 0 and, for k = 3, the guidance interval), Linear -> SiLU -> Linear.
    ``neutral()`` is the no-guidance input (omega = 1, interval [0, 1])."""

    NEUTRAL = (1.0, 0.0, 1.0)

    def __init__(self, k: int, dim: int = 64):
        super().__init__()
        if k not in (1, 3):
            raise ValueError(f"guidance_dim: expected 1 (scale) or 3 (scale, t_min, t_max), got {k!r}")
        self.k = k
        self.net = nn.Sequential(nn.Linear(k, dim), nn.SiLU(), nn.Linear(dim, dim))

    def neutral(self, b: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.NEUTRAL[: self.k], dtype=like.dtype, device=like.device).expand(b, self.k)

    def forward(self, w: torch.Tensor, b: int, like: torch.Tensor) -> torch.Tensor:
        w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
        if w.dim() <= 1:
            w = w.expand(b) if w.dim() == 0 else w
            if self.k != 1 and w.shape == (b,):
                w = torch.cat([w[:, None], self.neutral(b, like)[:, 1:]], 1)
        w = w.reshape(b, -1) if b else w.reshape(0, self.k)
        if w.shape[1] != self.k:
            raise ValueError(f"w: expected guidance inputs of shape (B,) or (B, {self.k}), got {tuple(w.shape)}")
        feats = torch.cat([torch.log(w[:, :1]), w[:, 1:]], 1)
        return self.net(feats.to(self.net[0].weight.dtype))



class MLPFlowMap(nn.Module):
    """model(x, s, t, y=None, w=None) -> V(x, s, t), same shape and dtype as x.

    x (B, *shape); s, t (B,) or scalars, in [0, 1]; y optional int labels (B,) when ``num_classes``.
    Architecture: h = Linear([x, emb_s(s), emb_d(t - s) (, emb_y(y)) (, emb_w(w))]) then ``depth``
    blocks of SiLU -> Linear (residual), then SiLU -> Linear to the output. The last layer is
    zero-initialised. ``max_freq`` bounds the time frequencies: high ones make d/ds and d/dt of V (the
    JVP targets) large.

    Classifier-free guidance (both options off by default; the default model is unchanged, parameter
    for parameter and in its random initialisation):
    ``null_class=True`` (with num_classes): one more label row, label ``num_classes`` = the null class
    (label dropout), and y=None means the null class. ``guidance_dim`` 1 or 3: the guidance scale
    (and interval) as an input, ``w`` (B,) omega or (B, 3) [omega, t_min, t_max] (iMF, arXiv:2512.02012;
    TVM, arXiv:2511.19797); w=None is the neutral input (omega = 1, interval [0, 1]).
    ``aux_velocity=True``: an auxiliary velocity head, a second zero-initialised output layer on the last
    hidden state (iMF's, arXiv:2512.02012; created last, so the rest of the initialisation is unchanged);
    ``model(..., aux=True)`` returns (V, v_aux). Off by default.

    No dual form (``forward_jvp``): the MLP has no attention and no fused op, so torch.func.jvp is exact,
    compiles, and keeps the 2D results bit for bit what they were.
    """

    def __init__(self, shape=(2,), hidden: int = 256, depth: int = 4, emb_dim: int = 64,
                 num_classes: Optional[int] = None, max_freq: float = 32.0, null_class: bool = False,
                 guidance_dim: int = 0, aux_velocity: bool = False):
        super().__init__()
        from .nn.layers import check_size
        if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
            raise ValueError(f"shape: expected a tuple of per-sample sizes, e.g. (2,), got {shape!r}")
        self.shape = tuple(check_size("shape", n) for n in shape)
        d = int(math.prod(self.shape))
        check_size("hidden", hidden)
        check_size("depth", depth, 0)
        if check_size("emb_dim", emb_dim, 2) % 2:
            raise ValueError(f"emb_dim: must be even (sin and cos features), got {emb_dim}")
        if num_classes is not None:
            check_size("num_classes", num_classes, 0)
        if isinstance(max_freq, bool) or not isinstance(max_freq, numbers.Real) or not max_freq > 0:
            raise ValueError(f"max_freq: expected a positive number, got {max_freq!r}")
        if null_class and not num_classes:
            raise ValueError("null_class: needs num_classes (a class-conditional model)")
        self.num_classes = num_classes
        self.null_label = int(num_classes) if null_class else None
        self.guidance_dim = int(guidance_dim)
        self.emb_s = TimeEmbedding(emb_dim, max_freq)
        self.emb_d = TimeEmbedding(emb_dim, max_freq)
        self.emb_y = nn.Embedding(num_classes + (1 if null_class else 0), emb_dim) if num_classes else None
        self.emb_w = GuidanceEmbedding(self.guidance_dim, emb_dim) if self.guidance_dim else None
        n_in = d + 2 * emb_dim + (emb_dim if num_classes else 0) + (emb_dim if self.guidance_dim else 0)
        self.inp = nn.Linear(n_in, hidden)
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.aux_velocity = bool(aux_velocity)
        self.aux_out = nn.Linear(hidden, d) if aux_velocity else None
        if self.aux_out is not None:
            nn.init.zeros_(self.aux_out.weight)
            nn.init.zeros_(self.aux_out.bias)

    def forward(self, x, s, t, y=None, w=None, aux: bool = False):
        b = x.shape[0]
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(b)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
        feats = [x.reshape(b, self.out.out_features), self.emb_s(s), self.emb_d(t - s)]  # (b, -1) fails at b = 0
        if self.emb_y is not None:
            if y is None:
                if self.null_label is None:
                    raise ValueError("y: this model is class-conditional (num_classes set); pass labels")
                y = torch.full((b,), self.null_label, dtype=torch.long, device=x.device)
            feats.append(self.emb_y(y))
        if self.emb_w is not None:
            feats.append(self.emb_w(self.emb_w.neutral(b, x) if w is None else w, b, x))
        elif w is not None:
            raise ValueError("w: this model has no guidance input (build it with guidance_dim=1 or 3)")
        if aux and self.aux_out is None:
            raise ValueError("aux: this model has no auxiliary velocity head (build it with aux_velocity=True)")
        h = self.inp(torch.cat(feats, 1))
        for lin in self.blocks:
            h = h + lin(torch.nn.functional.silu(h))
        a = torch.nn.functional.silu(h)
        out = self.out(a).reshape(x.shape)
        return (out, self.aux_out(a).reshape(x.shape)) if aux else out


class TimeWeight(nn.Module):
    """sCM's learned adaptive loss weighting w_phi(s) (Lu & Song, arXiv:2410.11081): a scalar per time,
    Fourier features of s -> Linear -> SiLU -> Linear, the last layer zero-initialised (w = 0: the plain
    loss at the start). The sCM loss is exp(w(s)) * mse - w(s), whose minimiser in w is -log(mse): it
    divides each time's loss by its running scale. Attached to a flow map as ``model.loss_weight`` (so the
    optimizer, the checkpoint and the EMA carry it): methods.scm.prepare_model does that."""

    def __init__(self, dim: int = 64, max_freq: float = 32.0):
        super().__init__()
        self.emb = TimeEmbedding(dim, max_freq)
        self.out = nn.Linear(dim, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.out(torch.nn.functional.silu(self.emb(s))).reshape(-1)


class TrigFlowParam(nn.Module):
    """sCM's TrigFlow parameterisation (Lu & Song, arXiv:2410.11081) of a consistency function, exposed
    as the project's average velocity to t = 0.

    TrigFlow: x_theta = cos(theta) x0 + sin(theta) sigma_d eps, f(x_theta, theta) = cos(theta) x_theta
    - sin(theta) sigma_d F(x_theta / sigma_d, c(theta)). In the project's schedule x_s = (1 - s) x0 + s eps
    the same point is x_theta = (sigma_d / r) x_s with tan(theta) = s / ((1 - s) sigma_d),
    r = sqrt((1 - s)^2 sigma_d^2 + s^2); then V(x_s, s, 0) = (x_s - f) / s is

        V(x_s, s, 0) = (s - (1 - s) sigma_d^2) / r^2 * x_s + (sigma_d / r) * F(x_s / r, 2 theta / pi, 0)

    (no singularity at s = 0). The wrapped network ``net(x, c, 0, y=...)`` gets the time c = 2 theta / pi
    in [0, 1]. Only the target time t = 0 is defined (the consistency sampler and the sCM loss use
    nothing else); other t raise a ValueError."""

    def __init__(self, net: nn.Module, sigma_d: float = 1.0):
        super().__init__()
        if not sigma_d > 0:
            raise ValueError(f"sigma_d: expected a positive number, got {sigma_d!r}")
        self.net = net
        self.sigma_d = float(sigma_d)
        for k in ("num_classes", "null_label", "guidance_dim"):
            if hasattr(net, k):
                setattr(self, k, getattr(net, k))
        if getattr(self, "null_label", None) is None:  # nn.DiT keeps its null class in its label table
            from .methods._common import null_label
            try:
                self.null_label = null_label(net)
            except ValueError:
                self.null_label = None

    def forward(self, x, s, t, y=None, **kw):
        b = x.shape[0]
        s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(b)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(b)
        if bool((t != 0).any()):
            raise ValueError("t: TrigFlowParam defines only the target time t = 0")
        sd = self.sigma_d
        r = torch.sqrt((1 - s) ** 2 * sd ** 2 + s ** 2)
        theta = torch.atan2(s, (1 - s) * sd)
        shape = (b,) + (1,) * (x.dim() - 1)
        rb = r.reshape(shape)
        F = self.net(x / rb, theta * (2 / math.pi), t, y=y, **kw)
        return ((s - (1 - s) * sd ** 2) / r ** 2).reshape(shape) * x + (sd / rb) * F
