"""Ahead-of-time compile report: registers, spills, shared memory, tensor-core use and a static performance
report of every shipped Triton launch, for every GPU target a user may hold, without a GPU.

    python -m flowmap_kernels.compile_report [--arch sm_80 sm_86 sm_89 sm_90a sm_100a sm_120]
        [--head-dims 64 128] [--dtypes bf16] [--kernels forward jvp_forward] [--summary] [--json PATH]
        [--markdown PATH] [--no-cache]

The targets and their shared-memory limits come from :data:`configs.FAMILIES` (one source of truth): each
target compiles with the tiles its family's launcher picks (``configs.arch_family(target)``). Each Triton
kernel configuration that the launchers would use (no mask, not causal, contiguous inputs, lengths that
are multiples of 16, no GQA) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
cc, 32))`` using the same argument specialisation as Triton's JIT (integers equal to 1 become constants,
integers and pointers divisible by 16 get the divisibility hint). Triton emits the arch-specific targets
sm_90a, sm_100a and sm_120a for capabilities 90, 100 and 120 (``target`` in the records). Then

- registers and stack: ``cuobjdump --dump-resource-usage`` from the Triton wheel on the cubin;
- spill bytes: ``ptxas-blackwell -v`` from the Triton wheel on the PTX (stores + loads reported);
- shared memory: the compiled kernel's metadata (dynamic shared memory per block);
- tensor cores (``mma``: "mma.sync", "wgmma", "tcgen05" or "none", read from the PTX), their shapes
  (``wgmma_shapes``: static instruction counts by shape, e.g. {"m64n64k16": 16}; mma.sync shapes, or
  tcgen05 kinds, on other targets), ``waits_per_iteration`` (``wgmma.wait_group 0`` in the key loop),
  ``async_loads`` (cp.async or TMA), ``products_per_tile`` (``tt.dot`` ops per key-loop iteration in the
  TTIR, :func:`ttir_products`), ``num_warps``, ``num_stages`` and ``shipped`` (:func:`is_shipped`).

:func:`summaries` adds one record per (pass, dtype, head dim, target): the products of the pass against
the mathematical minimum and a predicted time ratio to FlashAttention-2 from a first-order model
(:func:`launch_efficiency`; an ESTIMATE, documented in docs/triton.md). ``--summary`` prints that table.

Records are dicts ``{kernel, family, config, arch, dtype, head_dim, registers, spill_bytes, shared_bytes,
uses_wgmma, mma, ..., source}``. Sources are pluggable (:data:`RECORD_SOURCES`): the Triton attention
kernels, and ``flowmap_kernels.compile_report.cuda.cuda_records(archs)`` (CUDA C++ kernels) when that module
exists. Results are cached by a hash of the kernel sources, config, Triton version and
:data:`RECORD_VERSION` (``--no-cache`` to disable).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

FAMILIES = ("jvp_backward", "jvp_forward", "backward", "forward")  # longest match first


def _targets() -> tuple:
    """(ARCHS, SHARED_LIMIT) derived from configs.FAMILIES: compile target -> capability x 10, and
    target -> its family's opt-in shared memory per block (bytes)."""
    from flowmap_kernels.attention.triton import configs
    archs, limits = {}, {}
    for fam in configs.FAMILIES.values():
        for t in fam.targets:
            major, minor = configs.parse_target(t)
            archs[t], limits[t] = 10 * major + minor, fam.shared_bytes
    return archs, limits


#: compile target ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120") -> GPUTarget capability
ARCHS, SHARED_LIMIT = _targets()
DEFAULT_HEAD_DIMS = (16, 32, 48, 64, 72, 80, 96, 128, 256)
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
TRITON_KERNELS = ("forward", "jvp_forward", "backward_prep", "backward_dkdv", "backward_dq",
                  "jvp_backward_prep", "jvp_backward_dkdv", "jvp_backward_dq")


def family(kernel: str) -> str:
    """Kernel family ("forward", "backward", "jvp_forward", "jvp_backward") named in a kernel name."""
    for f in FAMILIES:
        if kernel.startswith(f) or f"_{f}" in kernel or kernel.endswith(f):
            return f
    raise ValueError(f"kernel: {kernel!r} names no family of {FAMILIES}")


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the Triton wheel at {path}")
    return str(path)


def _aot_module():
    """The kernels' module imported with the interpreter off (JIT functions that can be compiled).

    Loaded under a private name so that an interpreted copy (TRITON_INTERPRET=1, tests) is untouched.
    """
    name = "flowmap_kernels.attention.triton._kernels_aot"
    if name in sys.modules:
        return sys.modules[name]
    pkg = importlib.import_module("flowmap_kernels.attention.triton")
    path = Path(pkg.__file__).parent / "kernels.py"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    return mod


def _signature(fn, args: list, constexprs: dict):
    """(signature, constexprs, attrs) as Triton's JIT would specialise ``args`` (plus ``constexprs``)."""
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, (name, a) in enumerate(zip(fn.arg_names, args)):
        if isinstance(a, float):
            sig[name] = "fp32"
            continue
        ty, spec = native_specialize_impl(BaseBackend, a, False, True, True)
        if ty == "constexpr":
            sig[name] = "constexpr"
            consts[name] = spec
            continue
        sig[name] = ty
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, consts, attrs


def triton_launches(head_dim: int, dtype_name: str, kernels: Iterable[str] = TRITON_KERNELS,
                    arch_family: str = "sm90", length: int = 256):
    """(kernel, fn, args, constexprs, config) of each Triton launch for one head dim and dtype.

    Uses the launchers' own argument builders on small CPU tensors (B=1, H=2, L=``length``).
    """
    import torch
    from flowmap_kernels.attention.triton import configs
    ta = _aot_module()
    dt = getattr(torch, DTYPE_NAMES.get(dtype_name, dtype_name))
    B, H, L, D = 1, 2, length, head_dim
    x = lambda: torch.empty(B, H, L, D, dtype=dt)  # noqa: E731
    q, k, v, tq, tk, tv, o, to, do, dto = (x() for _ in range(10))
    rows = lambda: torch.empty(B, H, L, dtype=torch.float32)  # noqa: E731
    lse, mu, const, crow = rows(), rows(), rows(), rows()
    p = ta.Plan(q, k, v, None, False, D ** -0.5)
    p.set_align(q, k, v, tq, tk, tv, o, to, do, dto)
    p.arch = arch_family
    out = []
    for kernel in kernels:
        tangent = kernel.startswith("jvp")
        if kernel in ("forward", "jvp_forward"):
            cfg = p.config(kernel)
            args = ta._fwd_args(p, q, k, v, *((tq, tk, tv) if tangent else (None,) * 3), o, to if tangent else None,
                                lse, mu if tangent else None)
            ce = p.constexprs(TANGENT=tangent, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
            out.append((kernel, ta._attn_fwd, args, ce, cfg))
            continue
        flags = dict(TANGENT=tangent, HAS_DO=True)
        tk3 = (tq, tk, tv) if tangent else (None,) * 3
        if kernel.endswith("_prep"):
            cfg = configs.PREP_CONFIG
            args = ta._prep_args(p, o, do, to if tangent else None, dto if tangent else None, mu if tangent else None,
                                 const, crow if tangent else None)
            ce = dict(DV=p.DV, BLOCK_M=cfg.block_m, BLOCK_DV=p.block_dv, ALIGN=p.align,
                      LARGE_OFFSETS=p.large_offsets, VARLEN=p.varlen, **flags)
            out.append((kernel, ta._attn_bwd_prep, args, ce, cfg))
        elif kernel.endswith("_dkdv"):
            cfg = p.config(kernel)
            args = ta._bwd_args(p, q, k, v, *tk3, do, dto if tangent else None, lse, mu if tangent else None, const,
                                crow if tangent else None, [dq := torch.empty_like(k), torch.empty_like(v)] * 2)
            args += [*dq.stride(), *v.stride(), *p.mstrides, p.Hkv, p.G, p.Lq, p.Lk, p.scale]
            for want in ta.dkdv_parts(cfg, tangent):
                ce = p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **dict(zip(ta.DKDV_FLAGS, want)), **flags)
                out.append((kernel + ta.DKDV_SUFFIX.get(want, ""), ta._attn_bwd_dkdv, args, ce, cfg))
        elif kernel.endswith("_dq"):
            cfg = p.config(kernel)
            dq = torch.empty_like(q)
            args = ta._bwd_args(p, q, k, v, *tk3, do, dto if tangent else None, lse, mu if tangent else None, const,
                                crow if tangent else None, [dq, dq, torch.empty(q.shape, dtype=torch.float32)])
            args += [*dq.stride(), *p.mstrides, p.H, p.G, p.Lq, p.Lk, p.scale]
            for want in ta.dq_parts(cfg, tangent):
                ce = p.constexprs(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **dict(zip(ta.DQ_FLAGS, want)), **flags)
                out.append((kernel + ta.DQ_SUFFIX[want], ta._attn_bwd_dq, args, ce, cfg))
        else:
            raise ValueError(f"kernels: unknown Triton kernel {kernel!r}; expected some of {TRITON_KERNELS}")
    return out


_REG = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
#: Version of the record layout: part of the cache key, so records cached by an older report are remade.
RECORD_VERSION = 3

# ---- static analysis of the compiled text (TTIR, PTX) ----------------------------------------------------

_WGMMA = re.compile(r"\bwgmma\.mma_async(?:\.sp)?\.sync\.aligned\.(m\d+n\d+k\d+)\b")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\b")
_TCGEN05 = re.compile(r"\btcgen05\.mma(?:\.sp)?\.(cta_group::\d)\.(kind::\w+)")
_WAIT0 = re.compile(r"\bwgmma\.wait_group\.sync\.aligned\s+0\s*;")
_LABEL = re.compile(r"^\s*(\$L__BB\d+_\d+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+)\s*;")


def mma_kind(ptx: str) -> str:
    """Tensor-core instruction kind in a PTX text: "tcgen05", "wgmma", "mma.sync" or "none"."""
    if _TCGEN05.search(ptx):
        return "tcgen05"
    if _WGMMA.search(ptx):
        return "wgmma"
    if _MMA_SYNC.search(ptx):
        return "mma.sync"
    return "none"


def mma_shapes(ptx: str) -> dict:
    """Static count of tensor-core instructions by shape: {"m64n64k16": 8, ...} for wgmma and mma.sync,
    {"tcgen05.cta_group::1.kind::f16": 2} for tcgen05 (the shape of a tcgen05.mma is in its instruction
    descriptor, a runtime operand, so only the kind is read)."""
    out: dict = {}
    for m in _WGMMA.finditer(ptx):
        out[m.group(1)] = out.get(m.group(1), 0) + 1
    for m in _TCGEN05.finditer(ptx):
        key = f"tcgen05.{m.group(1)}.{m.group(2)}"
        out[key] = out.get(key, 0) + 1
    if not out:
        for m in _MMA_SYNC.finditer(ptx):
            out[m.group(1)] = out.get(m.group(1), 0) + 1
    return out


def ptx_loops(ptx: str) -> list:
    """Loops of a PTX text as (first line, last line) ranges: a branch back to a label above it."""
    lines = ptx.splitlines()
    where = {}
    loops = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            where[m.group(1)] = i
        for b in _BRANCH.findall(line):
            if b in where and where[b] <= i:
                loops.append((where[b], i))
    return loops


def ptx_main_loop(ptx: str) -> Optional[str]:
    """Text of the key loop: the innermost PTX loop (no loop nested in it) with the most tensor-core
    instructions; None when no loop holds one."""
    lines = ptx.splitlines()
    loops = ptx_loops(ptx)
    inner = [(a, b) for a, b in loops if not any((c, d) != (a, b) and a <= c and d <= b for c, d in loops)]
    best, best_n = None, 0
    for a, b in inner:
        body = "\n".join(lines[a:b + 1])
        n = sum(len(r.findall(body)) for r in (_WGMMA, _TCGEN05, _MMA_SYNC))
        if n > best_n:
            best, best_n = body, n
    return best


def waits_per_iteration(ptx: str) -> Optional[int]:
    """``wgmma.wait_group 0`` (wait for every outstanding wgmma) inside the key loop; None without wgmma."""
    if not _WGMMA.search(ptx):
        return None
    body = ptx_main_loop(ptx)
    return len(_WAIT0.findall(body)) if body is not None else 0


def async_loads(ptx: str) -> str:
    """Asynchronous global->shared copies in a PTX text: "tma" (cp.async.bulk.tensor), "cp.async" or "none"."""
    if re.search(r"\bcp\.async\.bulk\.tensor\b", ptx):
        return "tma"
    if re.search(r"\bcp\.async\.(?:ca|cg)\b", ptx):
        return "cp.async"
    return "none"


def traps(ptx: str) -> int:
    """``trap`` instructions in a PTX text. The attention kernels have no device asserts, so a trap means
    the compiler replaced code it could not lower (e.g. a kernel whose whole body became ``trap;``)."""
    return len(re.findall(r"^\s*(?:@!?%p\d+\s+)?trap\s*;", ptx, re.M))


_DOT = re.compile(r"\btt\.dot(?:_scaled)?\b")


def ttir_products(ttir: str) -> tuple:
    """(products per key-loop iteration, products outside it) of a Triton TTIR text.

    Counts ``tt.dot`` ops (one per matrix product; 3xTF32 is decomposed after TTIR, so a float32 product
    is still one dot). Each dot belongs to its nearest enclosing ``scf.for``; the key loop is the
    ``scf.for`` with the most dots directly in its body (dots in loops nested inside it are not its own).
    Dots in no loop, or in another loop, are counted as outside. Regions are read from the printed form:
    an op opening a region ends its line with ``{``, a region closes on a line starting with ``}``.
    """
    stack: list = []  # one entry per open region: loop id or None
    loops = 0
    per_loop: dict = {}
    outside = 0
    for line in ttir.splitlines():
        s = line.strip()
        if s.startswith("}"):
            if stack:
                stack.pop()
            s = s[1:].strip()
        if _DOT.search(s) and not s.endswith("{"):
            loop = next((x for x in reversed(stack) if x is not None), None)
            if loop is None:
                outside += 1
            else:
                per_loop[loop] = per_loop.get(loop, 0) + 1
        if s.endswith("{"):
            if re.search(r"\bscf\.for\b", s):
                stack.append(loops)
                loops += 1
            else:
                stack.append(None)
    if not per_loop:
        return 0, outside
    key = max(per_loop, key=lambda k: per_loop[k])
    return per_loop[key], outside + sum(n for k, n in per_loop.items() if k != key)


def _measure(compiled, arch: str) -> dict:
    """Registers/stack (cuobjdump), spill bytes (ptxas-blackwell -v), shared bytes, tensor-core kind,
    shapes, key-loop waits, async loads and products per tile of one compiled kernel."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    target = m.group(1) if m else arch  # what Triton emitted (capability 120 -> sm_120a)
    with tempfile.TemporaryDirectory() as tmp:
        cub = Path(tmp, "k.cubin")
        cub.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cub)], capture_output=True, text=True)
        m = _REG.search(res.stdout)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (getattr(compiled, "n_regs", -1), -1)
        ptx_path = Path(tmp, "k.ptx")
        ptx_path.write_text(ptx)
        res = subprocess.run([_tool("ptxas-blackwell"), "-v", f"-arch={target}", str(ptx_path), "-o",
                              str(Path(tmp, "o.cubin"))], capture_output=True, text=True)
        spills = [(int(a), int(b)) for a, b in _SPILL.findall(res.stdout + res.stderr)]
    spill_bytes = sum(a + b for a, b in spills) if spills else -1
    per_tile, outside = ttir_products(compiled.asm.get("ttir", ""))
    loop = ptx_main_loop(ptx)
    return dict(registers=regs, stack_bytes=stack, spill_bytes=spill_bytes,
                shared_bytes=int(compiled.metadata.shared), uses_wgmma=bool(_WGMMA.search(ptx)),
                target=target, mma=mma_kind(ptx), wgmma_shapes=mma_shapes(ptx),
                loop_mma_shapes=mma_shapes(loop) if loop else {}, waits_per_iteration=waits_per_iteration(ptx),
                async_loads=async_loads(ptx) != "none", async_load_kind=async_loads(ptx),
                products_per_tile=per_tile, products_outside_loop=outside, traps=traps(ptx))


def _cache_key(kernel, fn, sig, consts, attrs, cfg, arch) -> str:
    import triton
    from flowmap_kernels.attention.triton import configs
    src = Path(_aot_module().__file__).read_bytes() + Path(configs.__file__).read_bytes()
    blob = repr((kernel, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()), str(cfg), arch,
                 triton.__version__, RECORD_VERSION)).encode()
    return hashlib.sha256(src + blob).hexdigest()[:24]


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "flowmap_kernels", "compile_report.json")


def _compile_one(task) -> dict:
    """Compile and measure one launch: task = (arch, dtype, head_dim, kernel name incl. part suffix
    [, config tuple])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flowmap_kernels.attention.triton import configs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch, dtype, d, name = task[:4]
    fam = configs.arch_family(arch)
    base = name.split("[")[0]
    if len(task) > 4:  # the parent's config (it may come from configs.override in the parent)
        with configs.override(configs.Config(*task[4])):
            launches = triton_launches(d, dtype, [base], fam)
    else:
        launches = triton_launches(d, dtype, [base], fam)
    for kernel, fn, args, ce, cfg in launches:
        if kernel != name:
            continue
        sig, consts, attrs = _signature(fn, args, ce)
        compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                               enable_fp_fusion=_aot_module().ENABLE_FP_FUSION))
        return dict(kernel=kernel, family=family(kernel), config=str(cfg), arch=arch, dtype=dtype, head_dim=d,
                    **_measure(compiled, arch), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    block_m=cfg.block_m, block_n=cfg.block_n, shipped=is_shipped(base, dtype, d, arch, cfg),
                    source="triton")
    raise ValueError(f"kernels: no launch named {name!r}")


def is_shipped(kernel: str, dtype: str, head_dim: int, arch: str, cfg) -> bool:
    """Whether a launch (base kernel name, config) is what the "auto" backend runs on ``arch``: the
    config :func:`configs.get_config` returns there (the row pre-passes: ``configs.PREP_CONFIG``), for a
    dtype / head dim the registry routes to Triton (float32: :func:`configs.fp32_head_dim_supported`)."""
    from flowmap_kernels.attention.triton import configs
    if dtype == "fp32" and not configs.fp32_head_dim_supported(head_dim):
        return False
    if kernel.endswith("_prep"):
        want = configs.PREP_CONFIG
    else:
        want = configs.get_config(kernel, head_dim, DTYPE_NAMES.get(dtype, dtype), configs.arch_family(arch))
    return str(want) == str(cfg)


# ---- static performance report: products per pass and a first-order time model (an ESTIMATE) ----------

#: Passes and their launches (base kernel names; the row pre-passes have no matrix products).
PASSES = {"forward": ("forward",), "backward": ("backward_prep", "backward_dkdv", "backward_dq"),
          "jvp_forward": ("jvp_forward",),
          "jvp_backward": ("jvp_backward_prep", "jvp_backward_dkdv", "jvp_backward_dq")}
#: The mathematical minimum of matrix products per (query block x key block) tile (docs/math.md section 1).
MINIMUM_PRODUCTS = {"forward": 2, "backward": 5, "jvp_forward": 6, "jvp_backward": 15}
#: FlashAttention-2's products per tile and the pass it is compared with (forward-type / backward-type).
FA2_PRODUCTS = {"forward": 2, "backward": 5}
FA2_PASS = {"forward": "forward", "jvp_forward": "forward", "backward": "backward", "jvp_backward": "backward"}

#: The time model's assumptions (docs/triton.md, "Static performance report"). Only sm_90a (H100 SXM5) is
#: modelled, where both figures below were measured by the same paper (arXiv:2407.08608, its forward and
#: backward speed figures on an H100 80GB SXM5: bf16, head dim 128, sequence length 16k, not causal; dense
#: peak 989 TFLOP/s):
#: - FlashAttention-2: forward 370 TFLOP/s (0.37 of peak), backward 322 TFLOP/s (0.33);
#: - the Triton FlashAttention forward (wgmma, one full wgmma wait per key block, 3 stages): 395 TFLOP/s
#:   (0.40): the reference efficiency of a Triton wgmma kernel with that structure.
MODEL = {
    "sm_90a": dict(peak_tflops=989.0, triton_reference=0.40, fa2={"forward": 0.37, "backward": 0.33},
                   sm_registers=65536, sm_shared=233472, max_warps=64),
}
MODEL_FACTORS = dict(single_stage=0.8, one_warpgroup=0.75, spills=0.7, wgmma_full_width_n=64,
                     reference_products_per_wait=2)


def launch_efficiency(rec: dict) -> Optional[dict]:
    """First-order fraction of the tensor-core peak one launch reaches (an ESTIMATE), with its factors;
    None where the model has no figures (targets other than sm_90a, float32, no key loop).

    efficiency = triton_reference x width x waits x stages x occupancy x spills, each factor <= 1:
    width: useful FLOPs / FLOP-time of the key loop's wgmma m64nNk16, where a wgmma with N < 64 takes the
    time of an m64n64 one (m64n16 ~ 1/4 the throughput per issue); waits: min(1, products per
    ``wgmma.wait_group 0`` / 2) (the reference loop waits once per 2 products; each drain exposes the
    non-matrix work); stages: 0.8 with num_stages = 1 (no prefetch of the next key block); occupancy:
    0.75 when registers or shared memory leave one warpgroup per SM (nothing to run while it waits);
    spills: 0.7 with any spill.
    """
    m = MODEL.get(rec.get("arch"))
    if m is None or rec.get("dtype") == "fp32" or not rec.get("products_per_tile") or rec.get("mma") != "wgmma":
        return None
    f = MODEL_FACTORS
    shapes = rec.get("loop_mma_shapes") or rec.get("wgmma_shapes") or {}
    work = total = 0.0
    for shape, count in shapes.items():
        mm = re.fullmatch(r"m(\d+)n(\d+)k(\d+)", shape)
        if not mm:
            continue
        flops = int(mm.group(1)) * int(mm.group(2)) * int(mm.group(3)) * count
        work += flops  # useful work; time: a wgmma narrower than N = 64 takes the issue time of an n64 one
        total += flops / min(1.0, int(mm.group(2)) / f["wgmma_full_width_n"])
    width = work / total if total else 1.0
    waits = rec.get("waits_per_iteration") or 0
    wait_f = 1.0 if waits == 0 else min(1.0, rec["products_per_tile"] / waits / f["reference_products_per_wait"])
    stages = f["single_stage"] if rec.get("num_stages", 2) <= 1 else 1.0
    threads = 32 * rec["num_warps"]
    regs = -(-max(rec["registers"], 1) // 8) * 8
    ctas = min(m["sm_registers"] // (regs * threads), m["max_warps"] // rec["num_warps"],
               m["sm_shared"] // max(rec["shared_bytes"] + 1024, 1))
    warpgroups = ctas * rec["num_warps"] / 4
    occupancy = 1.0 if warpgroups >= 2 else f["one_warpgroup"]
    spills = f["spills"] if rec.get("spill_bytes", 0) > 0 else 1.0
    eff = m["triton_reference"] * width * wait_f * stages * occupancy * spills
    return dict(efficiency=eff, width=width, waits=wait_f, stages=stages, occupancy=occupancy, spills=spills,
                resident_warpgroups=warpgroups)


def pass_of(kernel: str) -> str:
    """The pass ("forward", "backward", "jvp_forward", "jvp_backward") a launch belongs to."""
    return family(kernel)


def summaries(records: Iterable[dict]) -> list:
    """Per (pass, dtype, head dim, arch) summary of the Triton launch records.

    ``products``: the sum over the pass's launches of products per key-loop iteration (a pass may have
    several launches: dK/dV and dQ kernels, split launches); ``minimum_products``: docs/math.md section 1;
    ``complete``: every launch of the pass is among the records; ``predicted_ratio_fa2``: the modelled time
    of the pass over FlashAttention-2's forward (forward, jvp_forward) or backward (backward,
    jvp_backward) on the same problem, None where not modelled (:func:`launch_efficiency`): an ESTIMATE.
    """
    groups: dict = {}
    for r in records:
        if r.get("source", "triton") != "triton" or "products_per_tile" not in r:
            continue
        groups.setdefault((pass_of(r["kernel"]), r["dtype"], r["head_dim"], r["arch"]), []).append(r)
    order = list(PASSES)
    out = []
    for (p, dtype, d, arch), recs in sorted(groups.items(), key=lambda kv: (ARCHS.get(kv[0][3], 0), kv[0][1],
                                                                            kv[0][2], order.index(kv[0][0]))):
        present = {r["kernel"].split("[")[0] for r in recs}
        complete = set(PASSES[p]) <= present
        products = sum(r["products_per_tile"] for r in recs)
        ratio, model = None, {}
        m = MODEL.get(arch)
        heavy = [r for r in recs if r["products_per_tile"]]
        if m is not None and complete and heavy:
            effs = {r["kernel"]: launch_efficiency(r) for r in heavy}
            if all(e is not None for e in effs.values()):
                ours = sum(r["products_per_tile"] / effs[r["kernel"]]["efficiency"] for r in heavy)
                ref = FA2_PASS[p]
                fa2 = FA2_PRODUCTS[ref] / m["fa2"][ref]
                ratio = round(ours / fa2, 3)
                model = {k: round(e["efficiency"], 3) for k, e in effs.items()}
        out.append({"source": "summary", "pass": p, "dtype": dtype, "head_dim": d, "arch": arch,
                    "products": products, "minimum_products": MINIMUM_PRODUCTS[p],
                    "products_by_launch": {r["kernel"]: r["products_per_tile"] for r in recs},
                    "complete": complete, "shipped": all(r.get("shipped", False) for r in recs),
                    "efficiency_by_launch": model, "predicted_ratio_fa2": ratio})
    return out


def format_summary(rows: list) -> str:
    """The per-pass table: products vs the minimum and the predicted ratio to FlashAttention-2."""
    head = f"{'arch':7s} {'dtype':5s} {'D':>4s} {'pass':13s} {'products':>8s} {'minimum':>7s} " \
           f"{'vs FA2 (ESTIMATE)':>17s}  launches: products per tile [modelled efficiency]"
    lines = [head, "-" * len(head)]
    for s in rows:
        ratio = "-" if s["predicted_ratio_fa2"] is None else f"{s['predicted_ratio_fa2']:.2f}x"
        parts = ", ".join(f"{k} {n}" + (f" [{s['efficiency_by_launch'][k]:.2f}]" if k in s["efficiency_by_launch"]
                                         else "") for k, n in s["products_by_launch"].items())
        lines.append(f"{s['arch']:7s} {s['dtype']:5s} {s['head_dim']:>4d} {s['pass']:13s} {s['products']:>8d} "
                     f"{s['minimum_products']:>7d} {ratio:>17s}  {parts}" + ("" if s["complete"] else " (partial)"))
    return "\n".join(lines)


def _compile_in_subprocesses(tasks: list, workers: int) -> list:
    """Run :func:`_compile_one` on ``tasks`` in ``workers`` fresh Python processes.

    Fresh processes with TRITON_INTERPRET=0: Triton decorates its own language functions for the CPU
    interpreter when triton.language is first imported with TRITON_INTERPRET=1 (as in the test suite),
    and such a process cannot compile for a GPU target any more."""
    if not tasks:
        return []
    import flowmap_kernels
    root = str(Path(flowmap_kernels.__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    n = max(1, min(workers, len(tasks)))
    chunks = [tasks[i::n] for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "flowmap_kernels.compile_report", "--worker"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in chunks]
    outs = [p.communicate(json.dumps(c)) for p, c in zip(procs, chunks)]
    by_task = {}
    for p, c, (out, err) in zip(procs, chunks, outs):
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed (exit {p.returncode}):\n{err[-4000:]}")
        recs = json.loads(out.strip().splitlines()[-1])
        for t, r in zip(c, recs):
            by_task[repr(t)] = r
    return [by_task[repr(t)] for t in tasks]


def _worker_main() -> int:
    """--worker: compile the JSON list of tasks on stdin, print the records as one JSON line."""
    tasks = [tuple(tuple(x) if isinstance(x, list) else x for x in t) for t in json.loads(sys.stdin.read())]
    print(json.dumps([_compile_one(t) for t in tasks]))
    return 0


def triton_records(archs: Iterable[str] = tuple(ARCHS), head_dims: Iterable[int] = DEFAULT_HEAD_DIMS,
                   dtypes: Iterable[str] = ("bf16", "fp16", "fp32"), kernels: Iterable[str] = TRITON_KERNELS,
                   cache: Optional[Path] = None, progress: Optional[Callable[[dict], None]] = None,
                   workers: int = 1) -> list:
    """Compile and measure every Triton attention kernel launch; a list of records.

    ``cache``: JSON file of earlier records keyed by a hash of the kernel sources, config and arguments.
    Compiles run in ``workers`` fresh processes (0: one per CPU), see :func:`_compile_in_subprocesses`.
    """
    from flowmap_kernels.attention.triton import configs
    store = {}
    if cache is not None and cache.exists():
        try:
            store = json.loads(cache.read_text())
        except (OSError, ValueError):
            store = {}
    kernels = tuple(kernels)
    tasks = []  # (key, task)
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch: expected some of {tuple(ARCHS)}, got {arch!r}")
        fam = configs.arch_family(arch)
        for dtype in dtypes:
            if dtype not in DTYPE_NAMES:
                raise ValueError(f"dtypes: expected some of {tuple(DTYPE_NAMES)}, got {dtype!r}")
            for d in head_dims:
                for kernel, fn, args, ce, cfg in triton_launches(d, dtype, kernels, fam):
                    sig, consts, attrs = _signature(fn, args, ce)
                    cfg_t = (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, int(getattr(cfg, "split", 0)))
                    tasks.append((_cache_key(kernel, fn, sig, consts, attrs, cfg, arch),
                                  (arch, dtype, d, kernel, cfg_t)))
    todo = [t for k, t in tasks if k not in store]
    keys = {t: k for k, t in tasks}
    done = _compile_in_subprocesses(todo, workers or os.cpu_count() or 1)
    for t, rec in zip(todo, done):
        store[keys[t]] = rec
    records = [store[k] for k, _ in tasks]
    if progress:
        for r in records:
            progress(r)
    if cache is not None and todo:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(store))
        except OSError:
            pass
    return records


def cuda_records_source(archs, **_) -> list:
    """Records of the CUDA C++ kernels (flowmap_kernels.compile_report.cuda.cuda_records) when present."""
    try:
        mod = importlib.import_module("flowmap_kernels.compile_report.cuda")
    except ImportError:
        return []
    recs = []
    for r in mod.cuda_records(list(archs)):
        r = dict(r)
        r.setdefault("source", "cuda")
        recs.append(r)
    return recs


def triton_records_source(archs, head_dims=DEFAULT_HEAD_DIMS, dtypes=("bf16", "fp16", "fp32"),
                          kernels=TRITON_KERNELS, cache=None, progress=None, workers=1, **_) -> list:
    return triton_records(archs, head_dims, dtypes, kernels, cache, progress, workers)


#: Record sources: callables (archs, **filters) -> list of records. Append to add more.
RECORD_SOURCES: list = [triton_records_source, cuda_records_source]


def collect(archs=tuple(ARCHS), sources=None, **filters) -> list:
    """Records from every source for ``archs`` (filters: head_dims, dtypes, kernels, cache, progress)."""
    out = []
    for src in (RECORD_SOURCES if sources is None else sources):
        out.extend(src(tuple(archs), **filters))
    return out


def _mma(r: dict) -> str:
    return r.get("mma") or ("wgmma" if r.get("uses_wgmma") else "-")


def format_table(records: list) -> str:
    head = f"{'kernel':26s} {'arch':7s} {'dtype':5s} {'D':>4s} {'config':19s} {'regs':>4s} {'spill':>6s} " \
           f"{'shared':>7s} {'mma':8s} {'prod':>4s} {'waits':>5s} {'async':8s} shipped"
    lines = [head, "-" * len(head)]
    for r in records:
        waits = r.get("waits_per_iteration")
        lines.append(f"{r['kernel']:26s} {r['arch']:7s} {str(r.get('dtype', '')):5s} {str(r.get('head_dim', '')):>4s} "
                     f"{str(r.get('config', '')):19s} {r['registers']:>4d} {r['spill_bytes']:>6d} "
                     f"{r['shared_bytes']:>7d} {_mma(r):8s} {str(r.get('products_per_tile', '-')):>4s} "
                     f"{'-' if waits is None else str(waits):>5s} {r.get('async_load_kind', '-'):8s} "
                     f"{'yes' if r.get('shipped', True) else 'no'}")
    return "\n".join(lines)


def format_markdown(records: list) -> str:
    """Records as a Markdown table (kernel, arch, dtype, D, config, registers, spill bytes, shared, mma)."""
    lines = ["| kernel | arch | dtype | D | config | registers | spill bytes | shared bytes | mma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r.get('dtype', '')} | {r.get('head_dim', '')} | "
                     f"{r.get('config', '')} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{_mma(r)} |")
    return "\n".join(lines)


def arch_figures(records: Iterable[dict]) -> list:
    """Per compile target: launches, max registers, spilling launches and their largest spill, max shared
    bytes against the family's limit, and the tensor-core kinds emitted (Triton launch records only)."""
    from flowmap_kernels.attention.triton import configs
    out = {}
    for r in records:
        if r.get("source", "triton") != "triton":
            continue
        f = out.setdefault(r["arch"], dict(arch=r["arch"], family=configs.TARGETS[r["arch"]], launches=0,
                                           max_registers=0, spilling=0, max_spill_bytes=0, max_shared_bytes=0,
                                           shared_limit=SHARED_LIMIT[r["arch"]], mma=set(), target=set()))
        f["launches"] += 1
        f["max_registers"] = max(f["max_registers"], r["registers"])
        f["spilling"] += r["spill_bytes"] > 0
        f["max_spill_bytes"] = max(f["max_spill_bytes"], r["spill_bytes"])
        f["max_shared_bytes"] = max(f["max_shared_bytes"], r["shared_bytes"])
        f["mma"].add(_mma(r))
        f["target"].add(r.get("target", r["arch"]))
    rows = [dict(v, mma=sorted(v["mma"]), target=sorted(v["target"])) for k, v in out.items()]
    return sorted(rows, key=lambda v: ARCHS.get(v["arch"], 0))


def format_arch_figures(rows: list) -> str:
    head = f"{'arch':7s} {'family':6s} {'emits':8s} {'launches':>8s} {'max regs':>8s} {'spilling':>8s} " \
           f"{'max spill B':>11s} {'max shared':>10s} {'limit':>7s} mma"
    lines = [head, "-" * len(head)]
    for f in rows:
        lines.append(f"{f['arch']:7s} {f['family']:6s} {','.join(f['target']):8s} {f['launches']:>8d} "
                     f"{f['max_registers']:>8d} {f['spilling']:>8d} {f['max_spill_bytes']:>11d} "
                     f"{f['max_shared_bytes']:>10d} {f['shared_limit']:>7d} {','.join(f['mma'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--worker"]:
        return _worker_main()
    ap = argparse.ArgumentParser(prog="python -m flowmap_kernels.compile_report", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(DEFAULT_HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPE_NAMES))
    ap.add_argument("--kernels", nargs="+", default=list(TRITON_KERNELS), choices=list(TRITON_KERNELS))
    ap.add_argument("--json", type=Path, default=None,
                    help="write the records (then the per-pass summary records, source 'summary') to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="write the records as a Markdown table")
    ap.add_argument("--summary", action="store_true",
                    help="print the per-pass table: products per tile vs the minimum, predicted ratio to FA2")
    ap.add_argument("--triton-only", action="store_true", help="leave out the other record sources")
    ap.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {_default_cache()})")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (default: one per CPU)")
    a = ap.parse_args(argv)
    recs = collect(a.arch, sources=[triton_records_source] if a.triton_only else None, head_dims=a.head_dims,
                   dtypes=a.dtypes, kernels=a.kernels, cache=None if a.no_cache else _default_cache(),
                   workers=a.workers)
    summary = summaries(recs)
    if a.summary:
        print(format_summary(summary))
        print("\npredicted ratio: modelled time of the pass / FlashAttention-2's forward (forward, jvp_forward) or"
              " backward (backward, jvp_backward) on the same problem; an ESTIMATE from the compiled code, no GPU"
              " (docs/triton.md, 'Static performance report')")
    else:
        print(format_table(recs))
        print()
        print(format_arch_figures(arch_figures(recs)))
    bad = [r for r in recs if r["shared_bytes"] > SHARED_LIMIT.get(r["arch"], 1 << 30)]
    spilled = [r for r in recs if r["spill_bytes"] > 0]
    print(f"\n{len(recs)} kernels; {len(spilled)} spill; {len(bad)} over the shared-memory limit")
    if a.json:
        a.json.write_text(json.dumps(recs + summary, indent=1))
    if a.markdown:
        a.markdown.write_text(format_markdown(recs) + "\n")
    return 0

