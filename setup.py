"""Build script: the CPU extension (always) and the CUDA module (when nvcc is found).

- ``flowmap_kernels._C_cpu``: torch.utils.cpp_extension.CppExtension (ninja) from csrc/cpu/*.cpp.
- ``flowmap_kernels._C_cuda``: a pybind11 module compiled by nvcc with the static CUDA runtime, NOT linked to
  torch (torch's CUDAExtension cannot build against a CPU torch); it takes raw pointers and a stream.
  Built as SASS for sm_80 (A100), sm_86 / sm_89 (RTX 30 / 40, L4, L40), sm_90a (H100 / H200), sm_100a
  (B200 / GB200) and sm_120 (RTX 50), plus PTX of the newest so that a later GPU can JIT it (override with
  FLOWMAP_CUDA_ARCHS="80,90a"); FLOWMAP_SKIP_CUDA=1 skips it; a failing nvcc build only warns unless
  FLOWMAP_REQUIRE_CUDA=1.
Both compile the row mathematics in csrc/include/flowmap/*.h.
Install: pip install --no-build-isolation -e .   (torch, pybind11 and ninja must be installed)
"""
import glob
import os
import shutil
import subprocess
import sysconfig
import warnings

from setuptools import Extension, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join("csrc", "include")


CUDA_ARCHS = "80,86,89,90a,100a,120"


def _archs():
    raw = os.environ.get("FLOWMAP_CUDA_ARCHS", CUDA_ARCHS)
    return [a.strip() for a in raw.split(",") if a.strip()]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


class NvccExtension(Extension):
    """A pybind11 module built by a direct nvcc call (see ``nvcc_command``)."""


def nvcc_command(nvcc, sources, output, archs, extra=()):
    """nvcc command line: SASS for every arch in ``archs`` and PTX of the last one (JIT for newer GPUs)."""
    import pybind11
    ptx = archs[-1]
    images = [f"sm_{a}" for a in archs] + [f"compute_{ptx}"]
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "--cudart", "static",
           "-I" + os.path.join(ROOT, INCLUDE), "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"],
           f"-DFLOWMAP_CUDA_ARCHS=\"{','.join(images)}\""]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return cmd + list(extra) + list(sources) + ["-o", output]


def _extensions():
    from torch.utils.cpp_extension import CppExtension
    exts = [CppExtension(
        "flowmap_kernels._C_cpu", sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(ROOT, INCLUDE)], extra_compile_args={"cxx": ["-O3", "-std=c++17"]})]
    if os.environ.get("FLOWMAP_SKIP_CUDA") != "1" and _nvcc() is not None:
        exts.append(NvccExtension("flowmap_kernels._C_cuda", sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))))
    return exts


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        failed = set()

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            keep, self.extensions = self.extensions, self._built()
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = keep

        def get_outputs(self):
            keep, self.extensions = self.extensions, self._built()
            try:
                return super().get_outputs()
            finally:
                self.extensions = keep

        def get_output_mapping(self):
            keep, self.extensions = self.extensions, self._built()
            try:
                return super().get_output_mapping()
            finally:
                self.extensions = keep

        def build_extensions(self):
            # torch's BuildExtension refuses .cu sources without a CUDA torch: build those with nvcc here
            nvcc_exts = [e for e in self.extensions if isinstance(e, NvccExtension)]
            keep = self.extensions
            self.extensions = [e for e in keep if not isinstance(e, NvccExtension)]
            try:
                super().build_extensions()
            finally:
                self.extensions = keep
            for ext in nvcc_exts:
                self._build_nvcc(ext)

        def _build_nvcc(self, ext):
            out = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            cmd = nvcc_command(_nvcc(), [os.path.join(ROOT, s) for s in ext.sources], out, _archs())
            print("building CUDA module:", " ".join(cmd))
            try:
                subprocess.check_call(cmd)
            except (subprocess.CalledProcessError, OSError) as e:
                self.failed.add(ext.name)
                if os.environ.get("FLOWMAP_REQUIRE_CUDA") == "1":
                    raise
                warnings.warn(f"flowmap_kernels: the CUDA module was not built ({e}); CUDA tensors use 'torch'")

    return {"build_ext": Build.with_options(use_ninja=True)}


try:
    import torch  # noqa: F401  (the extensions build against the installed torch)
except ImportError:  # e.g. an isolated build: install the pure-Python package, the "torch" backend serves
    warnings.warn("flowmap_kernels: torch is not importable at build time; building without the compiled "
                  "extensions (use pip install --no-build-isolation with torch installed)")
    setup()
else:
    setup(ext_modules=_extensions(), cmdclass=_cmdclass())
