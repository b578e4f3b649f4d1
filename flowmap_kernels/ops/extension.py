"""The "extension" backend: compiled kernels, same signatures as ``fused_torch``.

CPU tensors run ``flowmap_kernels._C_cpu`` (torch.utils.cpp_extension, ``csrc/cpu``); CUDA tensors run
``flowmap_kernels._C_cuda`` (a pybind11 module built by nvcc, not linked to torch: it takes raw device
pointers, sizes, row strides and the current CUDA stream). Both compile the row mathematics of
``csrc/include/flowmap/*.h``. float16, bfloat16 and float32 (fp32 accumulation); float64 runs on "torch".
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Optional

import torch

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_mods: dict = {}


@torch.compiler.assume_constant_result  # (traced code reads the result; dynamo cannot trace the import)
def _load(name: str):
    if name not in _mods:
        try:
            _mods[name] = importlib.import_module(f"flowmap_kernels.{name}")
        except ImportError as e:  # not built in this install
            _mods[name] = e
    m = _mods[name]
    return None if isinstance(m, Exception) else m


def cpu_module():
    """The CPU extension module, or None when it is not built."""
    return _load("_C_cpu")


def cuda_module():
    """The nvcc-built CUDA module, or None when it is not built."""
    return _load("_C_cuda")


def image_for(capability: tuple, images) -> Optional[str]:
    """The image of a fat binary that a GPU of compute ``capability`` (major, minor) loads, or None.

    ``images``: names such as "sm_80", "sm_90a", "compute_120". SASS "sm_XY" runs on capability X.Z with
    Z >= Y; an arch-specific "sm_XYa" only on X.Y exactly; PTX "compute_XY" is JIT-compiled on any
    capability >= X.Y. The driver prefers SASS, then the newest PTX that fits.
    """
    major, minor = capability
    sass, ptx = [], []
    for name in images:
        kind, _, arch = name.partition("_")
        specific = arch.endswith("a")
        num = int(arch.rstrip("a"))
        a_major, a_minor = divmod(num, 10)
        if kind == "sm" and a_major == major and (a_minor == minor if specific else a_minor <= minor):
            sass.append((a_minor, name))
        elif kind == "compute" and not specific and (a_major, a_minor) <= (major, minor):
            ptx.append((num, name))
    if sass:
        return max(sass)[1]
    return max(ptx)[1] if ptx else None


def cuda_images() -> list:
    """The images compiled into the CUDA module (SASS "sm_*" and PTX "compute_*"); [] when not built."""
    cu = cuda_module()
    return list(cu.archs()) if cu is not None else []


_warned_no_image: set = set()


def cuda_image_missing(device) -> Optional[str]:
    """None when the CUDA module has an image this device loads, else the reason (warned once per device)."""
    cap = torch.cuda.get_device_capability(device)
    if image_for(cap, cuda_images()) is not None:
        return None
    reason = (f"the CUDA module has no image for compute capability {cap[0]}.{cap[1]} (built for "
              f"{', '.join(cuda_images())}); rebuild with FLOWMAP_CUDA_ARCHS including it")
    if cap not in _warned_no_image:
        _warned_no_image.add(cap)
        import warnings
        warnings.warn(f"flowmap_kernels: {reason}; the DiT primitives run on the 'torch' backend", stacklevel=3)
    return reason


def extension_info() -> dict:
    """{"cpu_extension", "cuda_extension_built", "cuda_archs", "cuda_image_for_device"} for build_info():
    the last is the image this machine's current GPU loads (None without a GPU or without a fitting image)."""
    archs = cuda_images()
    device_image = None
    if archs and torch.cuda.is_available():
        device_image = image_for(torch.cuda.get_device_capability(), archs)
    return {"cpu_extension": cpu_module() is not None, "cuda_extension_built": cuda_module() is not None,
            "cuda_archs": archs, "cuda_image_for_device": device_image}


def available() -> bool:
    return cpu_module() is not None or cuda_module() is not None


def supports(device=None, dtype=None, explicit=False, numel=None, **_) -> Optional[str]:
    if numel == 0:
        return "empty input (the kernels launch at least one row): the 'torch' backend returns the empty result"
    if dtype not in _DTYPES:
        return f"dtype {dtype} runs on the 'torch' backend (the kernels take float16, bfloat16, float32)"
    if device is not None and device.type == "cpu":
        return None if cpu_module() is not None else "the CPU extension flowmap_kernels._C_cpu is not built"
    if device is not None and device.type == "cuda":
        if cuda_module() is None:
            return "the CUDA module flowmap_kernels._C_cuda is not built"
        return cuda_image_missing(device)
    return f"device {getattr(device, 'type', device)} is not supported (CPU or CUDA tensors)"


@torch.compiler.assume_constant_result  # (a compiled graph keeps the thread count it was traced with)
def _cpu_threads() -> int:
    return max(1, torch.get_num_threads())


def chunk_target(rows: int, device, groups: int = 1) -> int:
    """Rows per chunk of a reduction over rows (parameter gradients): enough chunks to fill the machine
    (GPU: ~1024 blocks); on the CPU whole groups when there are at least as many groups as threads (the
    kernel then writes the final gradient, no reduction of partial sums)."""
    if device.type == "cuda":
        return max(1, rows // 1024)
    threads = _cpu_threads()
    if groups >= threads:
        return max(1, rows)
    return max(1, rows // (4 * threads))


def _cpu(x):
    m = cpu_module()
    if m is None:
        raise RuntimeError("extension: flowmap_kernels._C_cpu is not built (pip install --no-build-isolation -e .)")
    return m


# ---- CUDA marshalling: raw pointers, sizes, row strides, stream -------------------------------------

def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else int(t.data_ptr())


def _rs(t: Optional[torch.Tensor]) -> int:
    """Row stride (elements) of a (R, C) tensor with unit column stride; 0 for None."""
    if t is None:
        return 0
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"extension: expected a (rows, C) tensor with unit column stride, got strides {t.stride()}")
    return int(t.stride(0))


def _m(t: Optional[torch.Tensor], R: int) -> int:
    """Rows per table row of a (M, C) operand (0 when absent)."""
    return 0 if t is None else R // t.shape[0]


def _stream(x: torch.Tensor) -> int:
    return int(torch.cuda.current_stream(x.device).cuda_stream)


def _guard(x: torch.Tensor):
    return torch.cuda.device(x.device)


def _is_cpu(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"


def _cuda_call(fn_name: str, x: torch.Tensor, *args):
    """Call the CUDA module's ``fn_name`` with ``args``, x's dtype code and the current stream of x's device."""
    cu = cuda_module()
    if cu is None:
        raise RuntimeError("extension: flowmap_kernels._C_cuda is not built (needs nvcc at install time)")
    with _guard(x):
        getattr(cu, fn_name)(*args, DTYPE_CODE[x.dtype], _stream(x))


def _contig(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


def _rows_out(x, n: int = 1):
    """``n`` new (R, C) tensors of x's dtype and device (the kernels' row outputs)."""
    return tuple(torch.empty(tuple(x.shape), dtype=x.dtype, device=x.device) for _ in range(n))


def _dispatch(device_arg: int = 0):
    """Decorator of the kernel wrappers: CPU tensors (argument ``device_arg``) run the CPU extension's function
    of the same name and arguments (several results as a tuple); CUDA tensors the decorated marshalling."""
    def wrap(cuda_fn):
        @functools.wraps(cuda_fn)
        def run(*args):
            x = args[device_arg]
            if _is_cpu(x):
                out = getattr(_cpu(x), cuda_fn.__name__)(*args)
                return out if isinstance(out, torch.Tensor) else tuple(out)
            return cuda_fn(*args)
        return run
    return wrap


def _partial(x, rpc, present):
    if not present:
        return x.new_empty((0,), dtype=torch.float32)
    return x.new_empty((x.shape[0] // rpc, x.shape[1]), dtype=torch.float32)


# ---- row norm ------------------------------------------------------------------------------------

@_dispatch()
def norm_forward(x, scale, shift, offset, center, eps):
    scale, shift = _contig(scale, shift)
    R, C = x.shape
    (y,) = _rows_out(x)
    stats = x.new_empty((R, 2), dtype=torch.float32)
    _cuda_call("norm_forward", x, _ptr(x), _rs(x), _ptr(scale), _m(scale, R), _ptr(shift), _m(shift, R),
               _ptr(y), _ptr(stats), R, C, float(offset), bool(center), float(eps))
    return y, stats


@_dispatch()
def norm_backward(x, scale, stats, gy, offset, center, rpc, has_shift):
    (scale,) = _contig(scale)
    R, C = x.shape
    (dx,) = _rows_out(x)
    ds, dh = _partial(x, rpc, scale is not None), _partial(x, rpc, has_shift)
    _cuda_call("norm_backward", x, _ptr(x), _rs(x), _ptr(scale), _m(scale, R), _ptr(stats), _ptr(gy), _rs(gy),
               _ptr(dx), _ptr(ds), _ptr(dh), R, C, float(offset), bool(center), int(rpc))
    return dx, ds, dh


@_dispatch()
def norm_jvp_forward(x, tx, scale, shift, tscale, tshift, offset, center, eps):
    scale, shift, tscale, tshift = _contig(scale, shift, tscale, tshift)
    R, C = x.shape
    y, ty = _rows_out(x, 2)
    stats = x.new_empty((R, 4), dtype=torch.float32)
    _cuda_call("norm_jvp_forward", x, _ptr(x), _rs(x), _ptr(tx), _rs(tx), _ptr(scale), _m(scale, R),
               _ptr(shift), _m(shift, R), _ptr(tscale), _m(tscale, R), _ptr(tshift), _m(tshift, R),
               _ptr(y), _ptr(ty), _ptr(stats), R, C, float(offset), bool(center), float(eps))
    return y, ty, stats


@_dispatch()
def norm_jvp_backward(x, tx, scale, tscale, stats, gy, gt, offset, center, rpc, has_shift):
    scale, tscale = _contig(scale, tscale)
    R, C = x.shape
    dx, dtx = _rows_out(x, 2)
    ds, dh = _partial(x, rpc, scale is not None), _partial(x, rpc, has_shift)
    dts, dth = _partial(x, rpc, scale is not None), _partial(x, rpc, has_shift)
    _cuda_call("norm_jvp_backward", x, _ptr(x), _rs(x), _ptr(tx), _rs(tx), _ptr(scale), _m(scale, R),
               _ptr(tscale), _m(tscale, R), _ptr(stats), _ptr(gy), _rs(gy), _ptr(gt), _rs(gt), _ptr(dx), _ptr(dtx),
               _ptr(ds), _ptr(dh), _ptr(dts), _ptr(dth), R, C, float(offset), bool(center), int(rpc))
    return dx, dtx, ds, dh, dts, dth


# ---- GELU ------------------------------------------------------------------------------------------

@_dispatch()
def gelu_forward(x, bias):
    (bias,) = _contig(bias)
    R, C = x.shape
    (y,) = _rows_out(x)
    _cuda_call("gelu_forward", x, _ptr(x), _rs(x), _ptr(bias), _ptr(y), R, C)
    return y


@_dispatch()
def gelu_backward(x, bias, gy, rpc):
    (bias,) = _contig(bias)
    R, C = x.shape
    (dx,) = _rows_out(x)
    db = _partial(x, rpc, bias is not None)
    _cuda_call("gelu_backward", x, _ptr(x), _rs(x), _ptr(bias), _ptr(gy), _rs(gy), _ptr(dx), _ptr(db), R, C, int(rpc))
    return dx, db


@_dispatch()
def gelu_jvp_forward(x, tx, bias, tbias):
    bias, tbias = _contig(bias, tbias)
    R, C = x.shape
    y, ty = _rows_out(x, 2)
    _cuda_call("gelu_jvp_forward", x, _ptr(x), _rs(x), _ptr(tx), _rs(tx), _ptr(bias), _ptr(tbias), _ptr(y), _ptr(ty),
               R, C)
    return y, ty


@_dispatch()
def gelu_jvp_backward(x, tx, bias, tbias, gy, gt, rpc):
    bias, tbias = _contig(bias, tbias)
    R, C = x.shape
    dx, dtx = _rows_out(x, 2)
    db, dtb = _partial(x, rpc, bias is not None), _partial(x, rpc, bias is not None)
    _cuda_call("gelu_jvp_backward", x, _ptr(x), _rs(x), _ptr(tx), _rs(tx), _ptr(bias), _ptr(tbias), _ptr(gy), _rs(gy),
               _ptr(gt), _rs(gt), _ptr(dx), _ptr(dtx), _ptr(db), _ptr(dtb), R, C, int(rpc))
    return dx, dtx, db, dtb


# ---- gated residual --------------------------------------------------------------------------------

@_dispatch()
def gated_forward(x, gate, y):
    (gate,) = _contig(gate)
    R, C = x.shape
    (out,) = _rows_out(x)
    _cuda_call("gated_forward", x, _ptr(x), _rs(x), _ptr(gate), _m(gate, R), _ptr(y), _rs(y), _ptr(out), R, C)
    return out


@_dispatch(device_arg=1)
def gated_backward(gate, y, go, rpc):
    (gate,) = _contig(gate)
    R, C = y.shape
    (dy,) = _rows_out(y)
    dg = _partial(y, rpc, True)
    _cuda_call("gated_backward", y, _ptr(gate), _m(gate, R), _ptr(y), _rs(y), _ptr(go), _rs(go), _ptr(dy), _ptr(dg),
               R, C, int(rpc))
    return dy, dg


@_dispatch()
def gated_jvp_forward(x, tx, gate, tgate, y, ty):
    gate, tgate = _contig(gate, tgate)
    R, C = x.shape
    out, tout = _rows_out(x, 2)
    _cuda_call("gated_jvp_forward", x, _ptr(x), _rs(x), _ptr(tx), _rs(tx), _ptr(gate), _m(gate, R), _ptr(tgate),
               _m(tgate, R), _ptr(y), _rs(y), _ptr(ty), _rs(ty), _ptr(out), _ptr(tout), R, C)
    return out, tout


@_dispatch(device_arg=2)
def gated_jvp_backward(gate, tgate, y, ty, go, gto, rpc):
    gate, tgate = _contig(gate, tgate)
    R, C = y.shape
    dy, dty = _rows_out(y, 2)
    dg, dtg = _partial(y, rpc, True), _partial(y, rpc, True)
    _cuda_call("gated_jvp_backward", y, _ptr(gate), _m(gate, R), _ptr(tgate), _m(tgate, R), _ptr(y), _rs(y), _ptr(ty),
               _rs(ty), _ptr(go), _rs(go), _ptr(gto), _rs(gto), _ptr(dy), _ptr(dty), _ptr(dg), _ptr(dtg), R, C,
               int(rpc))
    return dy, dty, dg, dtg


if os.environ.get("FLOWMAP_DISABLE_EXTENSION") == "1":  # force the "torch" path (debugging)
    _mods["_C_cpu"] = ImportError("disabled by FLOWMAP_DISABLE_EXTENSION=1")
    _mods["_C_cuda"] = ImportError("disabled by FLOWMAP_DISABLE_EXTENSION=1")
