"""Model zoo of the FPE benchmark: small flow-map networks called as ``model(x, s, t, y=None)``.

``dit-*``: ``flowmap_kernels.nn.DiT`` (every linear layer, norm, GELU and gated residual a package
primitive, attention ``flowmap_kernels.attention``), class-conditional with QK RMSNorm. ``mlp``:
``flowmap_kernels.models.MLPFlowMap`` (plain torch.nn layers, no attention).

Weights: parameters that a fresh model holds at exactly zero (adaLN-Zero modulation and the final
layer, zero-initialised output layers) are redrawn N(0, 0.02^2), so that the benchmark sees the
products of a network in training, not the shortcuts of its initialisation (a product with an all-zero
weight would otherwise be excluded from the FLOP count as a zero-operand product).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ModelSpec", "MODELS", "build_model", "model_names", "attention_fraction"]


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: ``kind`` "dit" or "mlp", per-sample data shape, constructor kwargs."""
    name: str
    kind: str
    shape: tuple
    kwargs: dict = field(default_factory=dict)
    num_classes: int = 0
    description: str = ""


def _dit(name: str, shape: tuple, patch: int, hidden: int, depth: int, heads: int, description: str) -> ModelSpec:
    """A class-conditional (10 classes) QK-norm DiT entry on (C, H, H) inputs."""
    c, size, _ = shape
    return ModelSpec(name, "dit", shape,
                     dict(input_size=size, patch_size=patch, in_channels=c, hidden_size=hidden, depth=depth,
                          num_heads=heads, num_classes=10, qk_norm=True), 10, description)


MODELS = {
    "dit-s": _dit("dit-s", (4, 16, 16), 1, 128, 4, 4,
                  "DiT on 16x16x4 latents, patch 1 (256 tokens), width 128, depth 4, 4 heads of 32, QK-norm"),
    "dit-b": _dit("dit-b", (4, 32, 32), 2, 384, 6, 6,
                  "DiT on 32x32x4 latents, patch 2 (256 tokens), width 384, depth 6, 6 heads of 64, QK-norm"),
    "dit-digits": _dit("dit-digits", (1, 8, 8), 1, 64, 2, 4,
                       "DiT on 8x8x1 digits, patch 1 (64 tokens), width 64, depth 2, 4 heads of 16"),
    "dit-tiny": _dit("dit-tiny", (1, 8, 8), 2, 32, 1, 2,
                     "DiT on 8x8x1 digits, patch 2 (16 tokens), width 32, depth 1 (tests)"),
    "mlp": ModelSpec("mlp", "mlp", (64,), dict(hidden=256, depth=4), 0,
                     "MLPFlowMap on 64-dim vectors (8x8 digits), hidden 256, depth 4, no attention"),
}


def model_names() -> list[str]:
    return sorted(MODELS)


def _redraw_zero_weights(model: torch.nn.Module, gen: torch.Generator) -> list[str]:
    names = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2 and p.numel() and not bool(p.ne(0).any()):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                names.append(n)
    return names


def attention_fraction(spec: ModelSpec, batch: int = 1) -> float:
    """Share of a DiT forward's FLOPs in attention's two products (analytic; 0 for the MLP)."""
    if spec.kind != "dit":
        return 0.0
    k = spec.kwargs
    n = (k["input_size"] // k["patch_size"]) ** 2
    d = k["hidden_size"]
    att = 4 * n * n * d
    lin = 2 * n * d * (3 * d + d + 2 * 4 * d)
    return att / (att + lin)


def build_model(name: str, *, batch: int, device="cpu", dtype=torch.float32, seed: int = 0):
    """(model, x0, cond, info) for zoo entry ``name``: x0 (batch, *shape) ~ N(0, 1), cond (batch,) labels
    for class-conditional models (else None), info a dict describing the model."""
    if name not in MODELS:
        raise ValueError(f"model: unknown model {name!r}; choose one of {model_names()}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    spec = MODELS[name]
    torch.manual_seed(seed)
    if spec.kind == "mlp":
        from ..models import MLPFlowMap
        model, impl = MLPFlowMap(shape=spec.shape, **spec.kwargs), "flowmap_kernels.models.MLPFlowMap"
    else:
        from ..nn import DiT
        model, impl = DiT(**spec.kwargs), "flowmap_kernels.nn.DiT"
    gen = torch.Generator().manual_seed(seed + 1)
    redrawn = _redraw_zero_weights(model, gen)
    model = model.to(device=device, dtype=dtype)
    x0 = torch.randn((batch,) + tuple(spec.shape), generator=gen, dtype=dtype).to(device)
    cond = (torch.randint(0, spec.num_classes, (batch,), generator=gen).to(device)
            if spec.num_classes else None)
    info = {"model": name, "model_impl": impl, "model_description": spec.description,
            "model_kwargs": dict(spec.kwargs), "model_params": sum(p.numel() for p in model.parameters()),
            "data_shape": list(spec.shape), "redrawn_zero_weights": len(redrawn),
            "attention_flop_share_forward": attention_fraction(spec)}
    if spec.kind == "dit":
        info["tokens"] = (spec.kwargs["input_size"] // spec.kwargs["patch_size"]) ** 2
    return model, x0, cond, info
