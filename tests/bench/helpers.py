"""Stand-in models for the FPE benchmark tests, and the scripts under benchmarks/ as modules."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from flowmap_kernels import ops


class AllGradMLP(nn.Module):
    """V(x, s, t) = L2(gelu(L1(a * x + b s + c t))) with ops.linear / ops.gelu_tanh.

    The input passes an elementwise learned map before the first product, so every matrix product's
    input requires a gradient (no input-gradient product is skipped by autograd) and every tangent
    direction of (x, s, t) reaches every product: the cost model of the write-up holds exactly
    (forward+JVP of a linear = 2 forwards, backward = 2, backward through the JVP = 4).
    """

    def __init__(self, d: int = 12, hidden: int = 24):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = nn.Parameter(1 + 0.1 * torch.randn(d, generator=g))
        self.b = nn.Parameter(torch.randn(d, generator=g))
        self.c = nn.Parameter(torch.randn(d, generator=g))
        self.w1 = nn.Parameter(torch.randn(hidden, d, generator=g) / d ** 0.5)
        self.w2 = nn.Parameter(torch.randn(d, hidden, generator=g) / hidden ** 0.5)
        self.bias1 = nn.Parameter(0.1 * torch.randn(hidden, generator=g))

    def forward(self, x, s, t, y=None):
        h = self.a * x + self.b * s[:, None] + self.c * t[:, None]
        return ops.linear(ops.gelu_tanh(ops.linear(h, self.w1), self.bias1), self.w2)


def build_allgrad(batch: int = 8, d: int = 12):
    model = AllGradMLP(d)
    x0 = torch.randn(batch, d, generator=torch.Generator().manual_seed(4))
    return model, x0, None, {"model": "allgrad-mlp", "model_impl": "tests.bench.helpers.AllGradMLP"}


def benchmark_script(name: str):
    """benchmarks/<name>.py loaded as a module (the folder is not a package the tests import from)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
