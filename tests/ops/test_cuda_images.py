"""The CUDA module's fat binary: which images it embeds and which one each GPU generation loads.

The build compiles SASS for sm_80, sm_86, sm_89, sm_90a, sm_100a and sm_120 and embeds PTX of the newest
(compute_120) for GPUs that come later. cuobjdump (shipped inside Triton's NVIDIA backend, or on PATH)
lists what the built module really holds; CI builds the module (FLOWMAP_REQUIRE_CUDA=1), so there the
test cannot skip.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flowmap_kernels.ops import extension as ext

BUILT_ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
IMAGES = BUILT_ARCHS + ["compute_120"]


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _module_file():
    cu = ext.cuda_module()
    if cu is None:
        if os.environ.get("FLOWMAP_REQUIRE_CUDA") == "1":
            pytest.fail("FLOWMAP_REQUIRE_CUDA=1 but flowmap_kernels._C_cuda is not built")
        pytest.skip("the CUDA module is not built in this install")
    return cu.__file__


def test_built_module_embeds_every_listed_arch_and_ptx():
    so = _module_file()
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found")
    elf = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", so], capture_output=True, text=True, check=True).stdout
    sass = set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))
    ptx_archs = {"compute_" + a for a in re.findall(r"\.sm_(\d+a?)\.ptx", ptx)}
    assert sass == set(BUILT_ARCHS), elf
    assert ptx_archs == {"compute_120"}, ptx
    assert ext.cuda_images() == IMAGES  # what the module reports about itself matches the binary


@pytest.mark.parametrize("capability, image", [
    ((8, 0), "sm_80"),       # A100
    ((8, 6), "sm_86"),       # RTX 30, A10, A40
    ((8, 7), "sm_86"),       # Orin: same major, newer minor runs sm_86 SASS
    ((8, 9), "sm_89"),       # RTX 40, L4, L40
    ((9, 0), "sm_90a"),      # H100 / H200
    ((10, 0), "sm_100a"),    # B200 / GB200
    ((12, 0), "sm_120"),     # RTX 50
    ((12, 1), "sm_120"),
    ((13, 0), "compute_120"),  # a future GPU JIT-compiles the PTX
    ((10, 3), None),         # sm_100a is arch-specific and the PTX (12.0) is newer: no image
    ((7, 5), None),
])
def test_image_for_capability(capability, image):
    assert ext.image_for(capability, IMAGES) == image


def test_arch_specific_sass_needs_the_exact_capability():
    assert ext.image_for((9, 0), ["sm_90a"]) == "sm_90a"
    assert ext.image_for((9, 1), ["sm_90a"]) is None
    assert ext.image_for((9, 1), ["sm_90"]) == "sm_90"
    assert ext.image_for((9, 0), ["compute_90a"]) is None  # arch-specific PTX is not forward compatible


def test_missing_image_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ext, "cuda_images", lambda: ["sm_80", "compute_80"][:1])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(ext, "_warned_no_image", set())
    with pytest.warns(UserWarning, match="no image for compute capability 9.0"):
        reason = ext.cuda_image_missing(torch.device("cuda", 0))
    assert "9.0" in reason and "sm_80" in reason
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ext.cuda_image_missing(torch.device("cuda", 0)) == reason  # warned once only
