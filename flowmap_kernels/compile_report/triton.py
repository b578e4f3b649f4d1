"""Compile report of the Triton attention kernels: each launch the Triton backend makes, compiled
ahead of time for a GPU target and measured (registers, spills, shared memory, tensor-core use, products
per tile), as records for :mod:`flowmap_kernels.compile_report` (which re-exports the public names).

The launches are the launchers' own descriptions (:mod:`flowmap_kernels.attention.triton.launch`), so the
report compiles exactly the arguments, constexprs and tiles the backend runs; :func:`_aot_module` supplies
kernels compiled with the interpreter off. Targets and their shared-memory limits come from
``configs.FAMILIES``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
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
TRITON_KERNELS = ("forward", "jvp_forward", "backward_prep", "backward_atomic", "backward_dkdv", "backward_dq",
                  "jvp_backward_prep", "jvp_backward_atomic", "jvp_backward_dkdv", "jvp_backward_dq")
#: Kernels of the deterministic backward (torch.use_deterministic_algorithms(True)): dQ in a pass of its own.
DETERMINISTIC_KERNELS = ("backward_dkdv", "backward_dq", "jvp_backward_dkdv", "jvp_backward_dq")
#: Problems whose launches the report compiles: "dense" (no mask, the default), "causal", a boolean or an
#: additive (float) mask of shape (1, 1, L, L), packed sequences ("varlen", two sequences) and the int64
#: row-offset kernels ("large_offsets", as for slices of more than 2**31 elements). The same tiles run
#: each (the tables are keyed by kernel, not by problem); the kernels compile the mask, causal, VARLEN
#: and LARGE_OFFSETS code in or out.
VARIANTS = ("dense", "causal", "bool_mask", "float_mask", "varlen", "large_offsets")


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
    """The kernels' module (attention/triton/kernels.py) imported with the interpreter off (JIT functions that
    can be compiled): the ``kernels`` of the plans whose launches the report compiles.

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
                    arch_family: str = "sm90", length: int = 256, variant: str = "dense") -> list:
    """The launches (:class:`flowmap_kernels.attention.triton.launch.Launch`) of the Triton kernels named in
    ``kernels`` (split launches come with their kernel) for one head dim and dtype.

    The launchers' own descriptions (``launch.forward_launches``, ``launch.backward_launches``) of a problem
    on small CPU tensors (B=1, H=2, L=``length``, the problem ``variant`` of :data:`VARIANTS`: by default no
    mask, not causal; dO and dtO given) with the tiles of ``arch_family``, launching the kernels of
    :func:`_aot_module`; where the launchers pad the head dim (``launch.launch_head_dims``), the launches of
    the padded width.
    """
    import torch
    from flowmap_kernels.attention.triton import launch
    kernels = tuple(kernels)
    unknown = [k for k in kernels if k not in TRITON_KERNELS]
    if unknown:
        raise ValueError(f"kernels: unknown Triton kernel {unknown[0]!r}; expected some of {TRITON_KERNELS}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    dt = getattr(torch, DTYPE_NAMES.get(dtype_name, dtype_name))
    B, H, L = 1, 2, length
    D = launch.launch_head_dims(head_dim, head_dim, arch_family)[0]  # the padded width where the launchers pad
    if variant == "varlen":  # packed (T, H, D) as the varlen launchers view them (launch._rows4)
        q, k, v, tq, tk, tv, do, dto = (launch._rows4(torch.empty(2 * L, H, D, dtype=dt)) for _ in range(8))
        cu = torch.tensor([0, L // 2, 2 * L], dtype=torch.int32)
    else:
        q, k, v, tq, tk, tv, do, dto = (torch.empty(B, H, L, D, dtype=dt) for _ in range(8))
    mask = {"bool_mask": torch.empty(1, 1, L, L, dtype=torch.bool),
            "float_mask": torch.empty(1, 1, L, L, dtype=dt)}.get(variant)

    def plan(deterministic):
        kw = dict(arch=arch_family, jit=_aot_module(), deterministic=deterministic)
        if variant == "varlen":
            packed = [launch._packed(x) for x in (q, k, v)]
            return launch._varlen_plan(*packed, cu, cu, 2 * L, 2 * L, False, D ** -0.5, **kw)[0]
        return launch.Plan(q, k, v, mask, variant == "causal", D ** -0.5, **kw)

    with launch.large_offsets(variant == "large_offsets"):
        return _launches(kernels, plan, dt, q, k, v, tq, tk, tv, do, dto)


def _launches(kernels, plan, dt, q, k, v, tq, tk, tv, do, dto) -> list:
    """The launches of ``kernels`` on the plans ``plan(deterministic)`` makes (see :func:`triton_launches`)."""
    import torch
    from flowmap_kernels.attention.triton import launch
    from flowmap_kernels.attention.triton.configs import without_variant

    passes: dict = {}
    out = []
    for kernel in kernels:
        name, deterministic = family(kernel), kernel in DETERMINISTIC_KERNELS
        if (name, deterministic) not in passes:
            tangents = (tq, tk, tv) if name.startswith("jvp") else ()
            (o, to, lse, mu), fwd = launch.forward_launches(plan(False), q, k, v, *tangents)
            if name == "jvp_forward":  # every variant: pointer loads where descriptors do not apply, float32 tO
                with launch.tensor_descriptors(False):
                    fwd = fwd + launch.forward_launches(plan(False), q, k, v, *tangents)[1]
                if dt != torch.float32:
                    fwd = fwd + launch.forward_launches(plan(False), q, k, v, *tangents,
                                                        tangent_dtype=torch.float32)[1]
                fwd = list({ln.name: ln for ln in fwd}.values())
            if name.endswith("forward"):
                passes[name, deterministic] = fwd
            else:
                passes[name, deterministic] = launch.backward_launches(
                    plan(deterministic), q, k, v, *(tangents or (None,) * 3), o, to, lse, mu, do,
                    dto if tangents else None)[1]
        out += [ln for ln in passes[name, deterministic] if without_variant(ln.name).split("[")[0] == kernel
                and isinstance(ln, launch.Launch)]
    return out


_REG = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
#: Local-memory stores / loads in SASS and their widths (Triton kernels use local memory only for spills).
_LOCAL = re.compile(r"\b(STL|LDL)(?:\.(U8|S8|U16|S16|64|128))?\b")
_LOCAL_BYTES = {None: 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
#: Version of the record layout: part of the cache key, so records cached by an older report are remade.
#: 4: spill bytes read from the cubin Triton built (before: a separate ptxas run without Triton's flags).
RECORD_VERSION = 4

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


def sass_spill_bytes(sass: str) -> tuple:
    """(store bytes, load bytes) of the local-memory instructions (STL / LDL) in a SASS listing: the
    static spill figures ptxas -v prints ("N bytes spill stores, M bytes spill loads"), read from the
    binary itself."""
    stores = loads = 0
    for op, width in _LOCAL.findall(sass):
        n = _LOCAL_BYTES[width or None]
        if op == "STL":
            stores += n
        else:
            loads += n
    return stores, loads


def _measure(compiled, arch: str) -> dict:
    """Registers/stack (cuobjdump), spill bytes (the STL / LDL of the cubin's SASS), shared bytes,
    tensor-core kind, shapes, key-loop waits, async loads and products per tile of one compiled kernel.

    Everything is read from the cubin Triton built (with its own ptxas and flags, e.g.
    ``--regAllocOptLevel=2``), which is what runs: a separate ptxas run on the PTX allocates differently."""
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    target = m.group(1) if m else arch  # what Triton emitted (capability 120 -> sm_120a)
    with tempfile.TemporaryDirectory() as tmp:
        cub = Path(tmp, "k.cubin")
        cub.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", "-sass", str(cub)],
                             capture_output=True, text=True)
    m = _REG.search(res.stdout)
    regs, stack = (int(m.group(1)), int(m.group(2))) if m else (getattr(compiled, "n_regs", -1), -1)
    spill_bytes = sum(sass_spill_bytes(res.stdout)) if res.returncode == 0 and "Function" in res.stdout else -1
    per_tile, outside = ttir_products(compiled.asm.get("ttir", ""))
    loop = ptx_main_loop(ptx)
    return dict(registers=regs, stack_bytes=stack, spill_bytes=spill_bytes,
                shared_bytes=int(compiled.metadata.shared), uses_wgmma=bool(_WGMMA.search(ptx)),
                target=target, mma=mma_kind(ptx), wgmma_shapes=mma_shapes(ptx),
                loop_mma_shapes=mma_shapes(loop) if loop else {}, waits_per_iteration=waits_per_iteration(ptx),
                async_loads=async_loads(ptx) != "none", async_load_kind=async_loads(ptx),
                products_per_tile=per_tile, products_outside_loop=outside, traps=traps(ptx))

def _cache_key(launch, sig, consts, attrs, arch) -> str:
    """Key of one launch's record: the sources of the kernels and configs (``shipped`` reads the tables),
    and what the launch compiles: its specialised signature, constexprs, options and target."""
    import triton
    from flowmap_kernels.attention.triton import configs
    from flowmap_kernels.attention.triton import launch as launch_module
    src = Path(_aot_module().__file__).read_bytes() + Path(configs.__file__).read_bytes()
    blob = repr((launch.name, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items()), str(launch.config),
                 launch_module.ENABLE_FP_FUSION, arch, triton.__version__, RECORD_VERSION)).encode()
    return hashlib.sha256(src + blob).hexdigest()[:24]


def _compile_one(task) -> dict:
    """Compile and measure one launch: task = (arch, dtype, head_dim, launch name, config name, variant)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from flowmap_kernels.attention.triton import configs
    from flowmap_kernels.attention.triton import launch as launch_module
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    arch, dtype, d, name, config, variant = task
    unnamed = configs.without_variant(name)  # (under one override config a launch variant takes its base's name)
    with configs.override(configs.Config.parse(config)):  # the parent's config (it may be an override there)
        launches = triton_launches(d, dtype, [unnamed.split("[")[0]], configs.arch_family(arch), variant=variant)
    for ln in launches:
        if configs.without_variant(ln.name) != unnamed:
            continue
        sig, consts, attrs = _signature(ln.kernel, ln.args, ln.constexprs)
        compiled = triton.compile(ASTSource(ln.kernel, sig, consts, attrs), target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options=dict(num_warps=ln.num_warps, num_stages=ln.num_stages,
                                               enable_fp_fusion=launch_module.ENABLE_FP_FUSION))
        cfg = ln.config
        return dict(kernel=name, family=family(name), config=str(cfg), arch=arch, dtype=dtype, head_dim=d,
                    variant=variant,
                    **_measure(compiled, arch), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    block_m=cfg.block_m, block_n=cfg.block_n, source="triton")
    raise ValueError(f"kernels: no launch named {name!r}")


def is_shipped(kernel: str, dtype: str, head_dim: int, arch: str, cfg) -> bool:
    """Whether a launch (base kernel name, config) is what the "auto" backend runs on ``arch``: the
    config :func:`configs.get_config` returns there (the row pre-passes: ``configs.PREP_CONFIG``), for a
    dtype / head dim the registry routes to Triton (float32: :func:`configs.fp32_head_dim_supported`)."""
    from flowmap_kernels.attention.triton import configs
    family_name = configs.arch_family(arch)
    if dtype == "fp32" and not configs.fp32_head_dim_supported(head_dim, arch=family_name):
        return False
    if kernel.endswith("_prep"):
        want = configs.PREP_CONFIG
    else:
        from flowmap_kernels.attention.triton.launch import launch_head_dims
        want = configs.get_config(kernel, launch_head_dims(head_dim, head_dim, family_name)[0],
                                  DTYPE_NAMES.get(dtype, dtype), family_name)
    return str(want) == str(cfg)


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
    tasks = [tuple(t) for t in json.loads(sys.stdin.read())]
    print(json.dumps([_compile_one(t) for t in tasks]))
    return 0


def triton_records(archs: Iterable[str] = tuple(ARCHS), head_dims: Iterable[int] = DEFAULT_HEAD_DIMS,
                   dtypes: Iterable[str] = ("bf16", "fp16", "fp32"), kernels: Iterable[str] = TRITON_KERNELS,
                   cache: Optional[Path] = None, progress: Optional[Callable[[dict], None]] = None,
                   workers: int = 1, variants: Iterable[str] = ("dense",)) -> list:
    """Compile and measure every Triton attention kernel launch of the problem ``variants``
    (:data:`VARIANTS`); a list of records.

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
            for d, variant in itertools.product(head_dims, variants):
                for ln in triton_launches(d, dtype, kernels, fam, variant=variant):
                    sig, consts, attrs = _signature(ln.kernel, ln.args, ln.constexprs)
                    tasks.append((_cache_key(ln, sig, consts, attrs, arch),
                                  (arch, dtype, d, ln.name, str(ln.config), variant)))
    # (a padded head dim compiles the launches of its tile width: one compile, a record per head dim; whether
    # a launch is shipped depends on the tables, not the compile, so it is decided here)
    todo: dict = {}
    for k, t in tasks:
        if k not in store:
            todo.setdefault(k, t)
    done = _compile_in_subprocesses(list(todo.values()), workers or os.cpu_count() or 1)
    for k, rec in zip(todo, done):
        store[k] = rec
    records = [dict(store[k], head_dim=d, variant=variant,
                    shipped=is_shipped(configs.table_key(name), dtype, d, arch, store[k]["config"]))
               for k, (arch, dtype, d, name, _, variant) in tasks]
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
