"""Ahead-of-time compile report: registers, spills, shared memory and wgmma use of every shipped kernel.

    python -m flowmap_kernels.compile_report [--arch sm_80 sm_90a] [--head-dims 64 128] [--dtypes bf16]
                                             [--kernels forward jvp_forward] [--json PATH] [--no-cache]

No GPU is needed: each Triton kernel configuration that the launchers would use (config table of
:mod:`flowmap_kernels.triton_kernels.configs`, no mask, not causal, contiguous inputs, lengths that are
multiples of 16, no GQA) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
using the same argument specialisation as Triton's JIT (integers equal to 1 become constants, integers and
pointers divisible by 16 get the divisibility hint). Then

- registers and stack: ``cuobjdump --dump-resource-usage`` from the Triton wheel on the cubin;
- spill bytes: ``ptxas-blackwell -v`` from the Triton wheel on the PTX (stores + loads reported);
- shared memory: the compiled kernel's metadata (dynamic shared memory per block);
- wgmma: whether the PTX contains ``wgmma`` instructions (sm_90a Hopper tensor-core path).

Records are dicts ``{kernel, family, config, arch, dtype, head_dim, registers, spill_bytes, shared_bytes,
uses_wgmma, source}``. Sources are pluggable (:data:`RECORD_SOURCES`): the Triton attention kernels, and
``flowmap_kernels.ops.compile_report.cuda_records(archs)`` (CUDA C++ kernels) when that module exists.
Results are cached by a hash of the kernel sources, config and Triton version (``--no-cache`` to disable).
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
ARCHS = {"sm_80": 80, "sm_90a": 90}
DEFAULT_HEAD_DIMS = (16, 32, 48, 64, 72, 80, 96, 128, 256)
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SHARED_LIMIT = {"sm_80": 166912, "sm_90a": 232448}  # opt-in shared memory per block, bytes
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
    name = "flowmap_kernels.triton_kernels._attention_aot"
    if name in sys.modules:
        return sys.modules[name]
    import flowmap_kernels.triton_kernels as pkg
    path = Path(pkg.__file__).parent / "attention.py"
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
    from flowmap_kernels.triton_kernels import configs
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
            ce = dict(DV=p.DV, BLOCK_M=cfg.block_m, BLOCK_DV=p.block_dv, ALIGN=p.align, **flags)
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


def _measure(compiled, arch: str) -> dict:
    """Registers/stack (cuobjdump), spill bytes (ptxas-blackwell -v), shared bytes, wgmma of one kernel."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        cub = Path(tmp, "k.cubin")
        cub.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cub)], capture_output=True, text=True)
        m = _REG.search(res.stdout)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (getattr(compiled, "n_regs", -1), -1)
        ptx_path = Path(tmp, "k.ptx")
        ptx_path.write_text(ptx)
        res = subprocess.run([_tool("ptxas-blackwell"), "-v", f"-arch={arch}", str(ptx_path), "-o",
                              str(Path(tmp, "o.cubin"))], capture_output=True, text=True)
        spills = [(int(a), int(b)) for a, b in _SPILL.findall(res.stdout + res.stderr)]
    spill_bytes = sum(a + b for a, b in spills) if spills else -1
    return dict(registers=regs, stack_bytes=stack, spill_bytes=spill_bytes,
                shared_bytes=int(compiled.metadata.shared), uses_wgmma=bool(re.search(r"\bwgmma\.", ptx)))


def _cache_key(kernel, fn, sig, consts, attrs, cfg, arch) -> str:
    import triton
    from flowmap_kernels.triton_kernels import configs
    src = Path(_aot_module().__file__).read_bytes() + Path(configs.__file__).read_bytes()
    blob = repr((kernel, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()), str(cfg), arch,
                 triton.__version__)).encode()
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
    from flowmap_kernels.triton_kernels import configs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch, dtype, d, name = task[:4]
    fam = configs.arch_family((ARCHS[arch] // 10, 0))
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
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        return dict(kernel=kernel, family=family(kernel), config=str(cfg), arch=arch, dtype=dtype, head_dim=d,
                    **_measure(compiled, arch), source="triton")
    raise ValueError(f"kernels: no launch named {name!r}")


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
    from flowmap_kernels.triton_kernels import configs
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
        fam = configs.arch_family((ARCHS[arch] // 10, 0))
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
    """Records of the CUDA C++ kernels (flowmap_kernels.ops.compile_report.cuda_records) when present."""
    try:
        mod = importlib.import_module("flowmap_kernels.ops.compile_report")
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


def format_table(records: list) -> str:
    head = f"{'kernel':20s} {'arch':7s} {'dtype':5s} {'D':>4s} {'config':14s} {'regs':>4s} {'spill':>6s} " \
           f"{'shared':>7s} {'wgmma':5s}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['kernel']:20s} {r['arch']:7s} {str(r.get('dtype', '')):5s} {str(r.get('head_dim', '')):>4s} "
                     f"{str(r.get('config', '')):14s} {r['registers']:>4d} {r['spill_bytes']:>6d} "
                     f"{r['shared_bytes']:>7d} {'yes' if r['uses_wgmma'] else 'no':5s}")
    return "\n".join(lines)


def format_markdown(records: list) -> str:
    """Records as a Markdown table (kernel, arch, dtype, D, config, registers, spill bytes, shared, wgmma)."""
    lines = ["| kernel | arch | dtype | D | config | registers | spill bytes | shared bytes | wgmma |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r.get('dtype', '')} | {r.get('head_dim', '')} | "
                     f"{r.get('config', '')} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{'yes' if r['uses_wgmma'] else 'no'} |")
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
    ap.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    ap.add_argument("--markdown", type=Path, default=None, help="write the records as a Markdown table")
    ap.add_argument("--triton-only", action="store_true", help="leave out the other record sources")
    ap.add_argument("--no-cache", action="store_true", help=f"recompile everything (cache: {_default_cache()})")
    ap.add_argument("--workers", type=int, default=0, help="compile processes (default: one per CPU)")
    a = ap.parse_args(argv)
    recs = collect(a.arch, sources=[triton_records_source] if a.triton_only else None, head_dims=a.head_dims,
                   dtypes=a.dtypes, kernels=a.kernels, cache=None if a.no_cache else _default_cache(),
                   workers=a.workers)
    print(format_table(recs))
    bad = [r for r in recs if r["shared_bytes"] > SHARED_LIMIT.get(r["arch"], 1 << 30)]
    spilled = [r for r in recs if r["spill_bytes"] > 0]
    print(f"\n{len(recs)} kernels; {len(spilled)} spill; {len(bad)} over the shared-memory limit")
    if a.json:
        a.json.write_text(json.dumps(recs, indent=1))
    if a.markdown:
        a.markdown.write_text(format_markdown(recs) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
