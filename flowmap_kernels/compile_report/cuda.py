"""Compile report of the CUDA kernels (csrc/cuda/kernels.cu): registers, spills, shared memory per kernel
and architecture, from ``nvcc -cubin -Xptxas -v`` (no GPU needed).

``cuda_records(archs=CUDA_ARCHS)`` -> list of {kernel, config, arch, registers, spill_bytes, shared_bytes,
uses_wgmma} (config: the element type the kernel template is instantiated for; uses_wgmma is False: these
are row-wise kernels without matrix instructions). Empty when nvcc or the sources are missing
(:func:`unavailable` says which: an installed wheel has no csrc/).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")
INCLUDE = os.path.join(ROOT, "csrc", "include")

_TYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}
# the architectures setup.py builds SASS for: A100, RTX 30 / 40, H100, B200, RTX 50
CUDA_ARCHS = ("80", "86", "89", "90a", "100a", "120")


def _demangle(names: list) -> dict:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str, arch: str) -> list:
    """Records from ptxas -v output of one compilation."""
    recs, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": 0, "spill_bytes": 0, "shared_bytes": 0}
            recs.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["shared_bytes"] = int(s.group(1)) if s else 0
    names = _demangle([r["mangled"] for r in recs])
    out = []
    for r in recs:
        full = names[r.pop("mangled")]
        m = re.search(r"(\w+)<([^>]+)>", full)
        kernel, config = (m.group(1), _TYPES.get(m.group(2).strip(), m.group(2).strip())) if m else (full, "")
        out.append({"kernel": kernel, "config": config, "arch": r["arch"] if r["arch"] else arch,
                    "registers": r["registers"], "spill_bytes": r["spill_bytes"],
                    "shared_bytes": r["shared_bytes"], "uses_wgmma": False})
    return out


def unavailable() -> Optional[str]:
    """Why :func:`cuda_records` returns no records here, or None when it can compile."""
    if not os.path.exists(SOURCE):
        return (f"the CUDA C++ sources are not next to the package ({SOURCE} is missing, as in an installed "
                "wheel); run from a source checkout of flowmap_kernels for these records")
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    return None


def cuda_records(archs: Iterable[str] = CUDA_ARCHS) -> list:
    """Compile kernels.cu to a cubin per arch with ptxas -v and return one record per kernel instance
    (none when :func:`unavailable` gives a reason)."""
    if unavailable() is not None:
        return []
    nvcc = shutil.which("nvcc")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            arch = str(arch).replace("sm_", "")
            cmd = [nvcc, "-O3", "-std=c++17", "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                   "-I" + INCLUDE, SOURCE, "-o", os.path.join(tmp, f"k_{arch}.cubin")]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed for sm_{arch}: {res.stderr[-2000:]}")
            records += parse_ptxas(res.stderr + res.stdout, f"sm_{arch}")
    return records

