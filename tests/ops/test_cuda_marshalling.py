"""The CUDA path up to the kernel call: pointers, row strides, sizes, table grouping, dtype code and the
stream handed to flowmap_kernels._C_cuda, checked against the real module's pybind signatures (the machine
has no GPU, so a recorder stands in for the module; the real module is imported and must refuse to run
without a driver)."""
import re

import pytest
import torch

from flowmap_kernels.ops import extension as E

REAL = E.cuda_module()
STREAM = 0xC0FFEE


def _kinds(fn):
    """Argument kinds ('int', 'float', 'bool') from a pybind11 signature docstring."""
    sig = fn.__doc__.splitlines()[0]
    kinds = []
    for ann in re.findall(r"arg\d+: ([^,)]+(?:\| [^,)]+)*)", sig):
        kinds.append("bool" if ann.strip() == "bool" else "float" if "Float" in ann else "int")
    return kinds


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, args))
        return call


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(E, "cuda_module", lambda: r)
    monkeypatch.setattr(E, "_is_cpu", lambda x: False)
    monkeypatch.setattr(E, "_stream", lambda x: STREAM)
    monkeypatch.setattr(E, "_guard", lambda x: __import__("contextlib").nullcontext())
    return r


def _check_signature(name, args):
    if REAL is None:
        pytest.skip("the CUDA module is not built here (no nvcc)")
    kinds = _kinds(getattr(REAL, name))
    got = ["bool" if isinstance(a, bool) else "float" if isinstance(a, float) else "int" for a in args]
    assert got == kinds, f"{name}: marshalled {got}, module expects {kinds}"


@pytest.mark.parametrize("dtype,code", [(torch.float32, 0), (torch.float16, 1), (torch.bfloat16, 2)])
def test_norm_jvp_forward_marshalling(rec, dtype, code):
    R, C = 12, 40
    base = torch.randn(R, 2 * C, dtype=dtype)
    x = base[:, :C]  # row stride 2C
    tx = torch.randn(R, C, dtype=dtype)
    scale, shift = torch.randn(3, C, dtype=dtype), torch.randn(1, C, dtype=dtype)
    tscale, tshift = torch.randn(3, C, dtype=dtype), torch.randn(1, C, dtype=dtype)
    y, ty, stats = E.norm_jvp_forward(x, tx, scale, shift, tscale, tshift, 1.0, True, 1e-6)
    (name, a), = rec.calls
    _check_signature(name, a)
    assert a[0] == x.data_ptr() and a[1] == 2 * C
    assert a[2] == tx.data_ptr() and a[3] == C
    assert (a[4], a[5], a[6], a[7]) == (scale.data_ptr(), R // 3, shift.data_ptr(), R)
    assert (a[8], a[9], a[10], a[11]) == (tscale.data_ptr(), R // 3, tshift.data_ptr(), R)
    assert (a[12], a[13], a[14]) == (y.data_ptr(), ty.data_ptr(), stats.data_ptr())
    assert a[15:20] == (R, C, 1.0, True, 1e-6) and a[20:] == (code, STREAM)
    assert y.dtype == dtype and ty.shape == (R, C) and stats.shape == (R, 4) and stats.dtype == torch.float32


def test_norm_backward_passes_null_for_absent_tables(rec):
    R, C = 8, 16
    x, gy = torch.randn(R, C), torch.randn(R, C)
    stats = torch.randn(R, 2)
    dx, ds, dh = E.norm_backward(x, None, stats, gy, 1.0, False, 4, False)
    (name, a), = rec.calls
    _check_signature(name, a)
    assert (a[2], a[3]) == (0, 0)
    assert a[8] == 0 and a[9] == 0  # no partial buffers
    assert ds.numel() == 0 and dh.numel() == 0 and a[-3] == 4


def test_every_cuda_entry_point_matches_the_module(rec):
    """Call each launcher once; every recorded call must match the pybind signature of the same name."""
    R, C = 6, 10
    t = lambda *s: torch.randn(*s)  # noqa: E731
    x, tx, gy, gt = t(R, C), t(R, C), t(R, C), t(R, C)
    sc, tsc = t(2, C), t(2, C)
    b, tb = t(1, C), t(1, C)
    E.norm_forward(x, sc, sc, 1.0, True, 1e-6)
    E.norm_backward(x, sc, t(R, 2), gy, 1.0, True, 3, True)
    E.norm_jvp_forward(x, tx, sc, sc, tsc, tsc, 1.0, True, 1e-6)
    E.norm_jvp_backward(x, tx, sc, tsc, t(R, 4), gy, gt, 1.0, True, 3, True)
    E.gelu_forward(x, b)
    E.gelu_backward(x, b, gy, 2)
    E.gelu_jvp_forward(x, tx, b, tb)
    E.gelu_jvp_backward(x, tx, b, tb, gy, gt, 2)
    E.gated_forward(x, sc, tx)
    E.gated_backward(sc, tx, gy, 3)
    E.gated_jvp_forward(x, tx, sc, tsc, gy, gt)
    E.gated_jvp_backward(sc, tsc, x, tx, gy, gt, 3)
    names = [n for n, _ in rec.calls]
    assert len(set(names)) == 12
    for name, args in rec.calls:
        _check_signature(name, args)
        assert args[-1] == STREAM and args[-2] == 0


def test_partial_sums_of_the_cuda_path_are_reduced_per_group(rec, monkeypatch):
    """rows per chunk on CUDA: enough chunks to fill the GPU, each inside one table group."""
    assert E.chunk_target(4096, torch.device("cuda")) == 4
    assert E.chunk_target(100, torch.device("cuda")) == 1


def test_real_module_refuses_without_a_driver():
    if REAL is None or torch.cuda.is_available():
        pytest.skip("needs the built CUDA module on a machine without a GPU driver")
    assert set(REAL.archs()) >= {"sm_80", "sm_90a"}
    x = torch.randn(4, 8)
    y = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        REAL.gelu_forward(x.data_ptr(), 8, 0, y.data_ptr(), 4, 8, 0, 0)
