"""Launches and bytes of a DiT block under torch.func.jvp plus the backward through the tangent:
the fused primitives (backend "auto": compiled kernels) against eager PyTorch (backend "naive").

Two measurements per configuration:
  block  the whole DiTBlock (adaLN-Zero, attention, MLP), jvp along (x, c), loss on the tangent, backward;
  parts  only its normalisation, modulation and activation parts (two modulated LayerNorms, QK RMSNorm on
         q and k, GELU-tanh with its bias, two gated residuals) with the block's shapes, the same way.
Launches: operator calls that run a kernel, counted with torch.profiler (leaf operators; views, reshapes
and allocations excluded). Bytes: the sizes of every tensor read and written by those operators (a
TorchDispatchMode sums input and output nbytes per operator call; the fused ops are single passes, so this
is their traffic; eager ops are counted one by one). On a GPU the script also times both (CUDA events).

usage: python benchmarks/bench_dit_block.py [--batch 2 --tokens 256 --hidden 384 --heads 6 --dtype float32]
       writes <out>.csv and <out>.json (default out: bench_out/dit_block)
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowmap_kernels as fk
from flowmap_kernels import ops
from flowmap_kernels.bench.harness import (device_error, metadata, pick_device, print_table, require_divides,
                                           require_ints, require_output, write_results)
from flowmap_kernels.nn import DiTBlock

NO_DATA = {
    "view", "_unsafe_view", "reshape", "as_strided", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
    "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "detach", "alias", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg", "lift_fresh", "_reshape_alias",
    "unflatten", "flatten", "contiguous", "narrow", "movedim", "view_as", "expand_as", "set_", "_make_dual",
    "_unpack_dual", "_has_same_storage_numel", "is_same_size", "result_type", "_local_scalar_dense", "item",
    "zeros_like_meta", "lift", "_conj", "conj", "clone_if_needed", "size", "stride", "sym_size", "sym_stride",
    "_efficientzerotensor", "dim", "numel",
}


def _short(name: str) -> str:
    n = name.split("::")[-1].split(".")[0]
    return n


def _is_launch(name: str) -> bool:
    return _short(name) not in NO_DATA


class ByteCounter(TorchDispatchMode):
    """Sums the nbytes of tensor inputs and outputs of each data-moving operator call."""

    def __init__(self):
        super().__init__()
        self.calls, self.bytes, self.by_op = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name() if hasattr(func, "name") else str(func)
        if _is_launch(name):
            def nbytes(o):
                if isinstance(o, torch.Tensor):
                    return o.numel() * o.element_size()
                if isinstance(o, (list, tuple)):
                    return sum(nbytes(v) for v in o)
                return 0
            b = nbytes(list(args)) + nbytes(list((kwargs or {}).values())) + nbytes(out)
            self.calls += 1
            self.bytes += b
            k = _short(name)
            self.by_op[k] = self.by_op.get(k, 0) + 1
        return out


def profiler_launches(step) -> tuple[int, int]:
    """(leaf operator calls that move data, CUDA kernels) of one step, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    leaf, kernels = 0, 0
    for e in prof.events():
        dev = getattr(e, "device_type", None)
        if dev is not None and str(dev).endswith("CUDA"):
            kernels += 1
            continue
        if not (e.name.startswith("aten::") or e.name.startswith("flowmap_kernels::")):
            continue
        children = [c for c in e.cpu_children if c.name.startswith("aten::") or c.name.startswith("flowmap_kernels::")]
        if not children and _is_launch(e.name):
            leaf += 1
    return leaf, kernels


def make_block(args, device, dtype):
    torch.manual_seed(0)
    block = DiTBlock(args.hidden, args.heads, mlp_ratio=4.0, qk_norm=True).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(dtype))
    B, N, C = args.batch, args.tokens, args.hidden
    x = torch.randn(B, N, C, device=device, dtype=dtype)
    c = torch.randn(B, C, device=device, dtype=dtype)
    return block, (x, c), (torch.randn_like(x), torch.randn_like(c))


def block_step(block, primals, tangents):
    gt = torch.randn_like(primals[0])  # dL/d(tangent output): a loss on the tangent, without its own ops

    def step():
        block.zero_grad(set_to_none=True)
        ps = [p.detach().requires_grad_() for p in primals]
        _, ty = torch.func.jvp(block, tuple(ps), tangents)
        ty.backward(gt)
    return step


def parts_step(args, device, dtype):
    """The block's normalisation / modulation / activation parts alone, with the block's shapes."""
    B, N, C, H = args.batch, args.tokens, args.hidden, args.heads
    D = C // H
    g = torch.Generator().manual_seed(2)

    def r(*s, scale=1.0):
        return (torch.randn(s, generator=g) * scale).to(device=device, dtype=dtype)

    prim = [r(B, N, C), r(B, 1, C), r(B, 1, C), r(B, 1, C), r(B, N, C), r(B, 1, C), r(B, 1, C), r(B, 1, C),
            r(B, N, 4 * C), r(4 * C, scale=0.1), r(B, N, C), r(B, H, N, D), r(B, H, N, D), r(D), r(D)]
    tang = [torch.randn_like(p) for p in prim]
    gts = [torch.randn_like(prim[i]) for i in (0, 11, 12, 0, 8, 0)]  # dL/d(tangent outputs)

    def parts(x, sa, ca, ga, attn_out, sm, cm, gm, h1, b1, mlp_out, q, k, wq, wk):
        a = ops.modulated_layer_norm(x, sa, ca)
        qn, kn = ops.rms_norm(q, wq), ops.rms_norm(k, wk)
        x1 = ops.gated_residual(x, ga, attn_out)
        m = ops.modulated_layer_norm(x1, sm, cm)
        h = ops.gelu_tanh(h1, b1)
        x2 = ops.gated_residual(x1, gm, mlp_out)
        return a, qn, kn, m, h, x2

    def step():
        ps = [p.detach().requires_grad_() for p in prim]
        _, touts = torch.func.jvp(parts, tuple(ps), tuple(tang))
        torch.autograd.backward(touts, gts)

    return step


def measure(step, backend, repeats, device):
    with fk.use_backend(backend):
        step()  # warm-up
        launches, cuda_kernels = profiler_launches(step)
        with ByteCounter() as bc:
            step()
        times = []
        if device.type == "cuda":
            for _ in range(repeats):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                step()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"launches": launches, "cuda_kernels": cuda_kernels, "dispatch_calls": bc.calls, "bytes": bc.bytes,
            "ms_median": times[len(times) // 2] if times else None, "ops": bc.by_op}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="bench_out/dit_block")
    args = ap.parse_args(argv)
    require_ints(ap, args, "batch", "tokens", "hidden", "heads", "repeats")  # usage errors before the run
    require_divides(ap, args, "heads", "hidden")
    if args.device != "auto" and device_error(args.device):
        ap.error(f"--device: {device_error(args.device)}")
    out = require_output(ap, args.out)
    device, dtype = pick_device(args.device), getattr(torch, args.dtype)

    block, primals, tangents = make_block(args, device, dtype)
    rows = []
    for what, step in (("block", block_step(block, primals, tangents)), ("parts", parts_step(args, device, dtype))):
        res = {b: measure(step, b, args.repeats, device) for b in ("naive", "auto")}
        n, f = res["naive"], res["auto"]
        rows.append({
            "what": what, "device": device.type, "dtype": args.dtype, "B": args.batch, "N": args.tokens,
            "C": args.hidden, "heads": args.heads,
            "launches_eager": n["launches"], "launches_fused": f["launches"],
            "launch_ratio": round(n["launches"] / max(f["launches"], 1), 2),
            "cuda_kernels_eager": n["cuda_kernels"], "cuda_kernels_fused": f["cuda_kernels"],
            "MB_eager": round(n["bytes"] / 2 ** 20, 2), "MB_fused": round(f["bytes"] / 2 ** 20, 2),
            "byte_ratio": round(n["bytes"] / max(f["bytes"], 1), 2),
            "ms_eager": round(n["ms_median"], 3), "ms_fused": round(f["ms_median"], 3),
            "ops_eager": n["ops"], "ops_fused": f["ops"],
        })
    cols = ["what", "device", "dtype", "B", "N", "C", "launches_eager", "launches_fused", "launch_ratio", "MB_eager",
            "MB_fused", "byte_ratio", "ms_eager", "ms_fused"]
    if device.type == "cuda":
        cols[8:8] = ["cuda_kernels_eager", "cuda_kernels_fused"]
    print_table(rows, cols)
    write_results(rows, out, meta=dict(metadata(device), config=vars(args), build=ops.extension_info()),
                  columns=cols)
    return rows


if __name__ == "__main__":
    main()
