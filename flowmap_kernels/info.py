"""What this install has: versions, usable backends per op, compiled extensions and their archs.

    python -m flowmap_kernels.info [--json]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch


def module_version(module: str):
    """``module.__version__``, or None when the module is missing or fails to import."""
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def build_info() -> dict:
    """A dict: torch/triton versions, usable backends per op, compiled extensions (cpu_extension,
    cuda_extension_built, cuda_archs) and where float64 attention runs."""
    from .attention.registry import ATTENTION
    from .attention.varlen_registry import ATTENTION_VARLEN
    from .ops import REGISTRIES, extension_info

    backends = {"attention": ATTENTION.usable(), "attention_varlen": ATTENTION_VARLEN.usable()}
    backends.update({name: reg.usable() for name, reg in REGISTRIES.items()})
    return {
        "version": importlib.import_module("flowmap_kernels").__version__,
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "backends": backends,
        "attention_float64": "torch",  # float64 never runs in Triton: the blockwise PyTorch path
        **extension_info(),
    }


def format_build_info(info: dict) -> str:
    """:func:`build_info` as aligned "name  value" lines, the usable backends one line per op."""
    show = lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
    flat = {k: v for k, v in info.items() if k not in ("version", "backends")}
    width = max([len(k) + 2 for k in flat] + [len(op) + 3 for op in info.get("backends", {})])  # one column
    lines = [f"flowmap_kernels {info.get('version')}"]
    lines += [f"{k:{width}s}{show(v)}" for k, v in flat.items()]
    lines.append("usable backends:")
    lines += [f"  {op:{width - 2}s}{show(names)}" for op, names in info.get("backends", {}).items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print :func:`build_info` (``--json``: as JSON)."""
    ap = argparse.ArgumentParser(prog="python -m flowmap_kernels.info", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the dict as JSON")
    args = ap.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=1) if args.json else format_build_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
