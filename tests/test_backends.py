"""The backend registry: names, scoping, threads, errors."""
import threading

import pytest
import torch

import flowmap_kernels as fk
from flowmap_kernels.attention import ATTENTION, make_problem, resolve_backend
from flowmap_kernels.backends import BackendUnavailableError, OpRegistry


def _problem(dtype=torch.float32):
    q = torch.randn(1, 1, 4, 8, dtype=dtype)
    return make_problem(q, q, q)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match=r"backend: unknown name 'cuda'; expected one of auto, naive, torch, triton"):
        fk.set_backend("cuda")
    with pytest.raises(ValueError, match=r"unknown name"):
        with fk.use_backend("flash"):
            pass


def test_auto_picks_torch_on_cpu_and_scopes_nest():
    p = _problem()
    assert fk.get_backend() == "auto"
    assert resolve_backend(p) == "torch"
    with fk.use_backend("naive"):
        assert resolve_backend(p) == "naive"
        with fk.use_backend("torch"):
            assert resolve_backend(p) == "torch"
        assert fk.get_backend() == "naive"
    assert fk.get_backend() == "auto"


def test_set_backend_is_global_and_scopes_win():
    try:
        fk.set_backend("naive")
        assert resolve_backend(_problem()) == "naive"
        with fk.use_backend("torch"):
            assert resolve_backend(_problem()) == "torch"
    finally:
        fk.set_backend("auto")


def test_use_backend_is_thread_local():
    seen = {}

    def worker():
        seen["other"] = fk.get_backend()

    with fk.use_backend("naive"):
        th = threading.Thread(target=worker)
        th.start()
        th.join()
        seen["here"] = fk.get_backend()
    assert seen == {"other": "auto", "here": "naive"}


def test_triton_named_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    impl = ATTENTION.impls["triton"]
    if not impl.is_available():  # triton not installed
        with pytest.raises(BackendUnavailableError, match=r"attention: backend 'triton' is not available"):
            resolve_backend(_problem(), "triton")
    else:
        with pytest.raises(BackendUnavailableError, match=r"needs CUDA tensors"):
            resolve_backend(_problem(), "triton")


def test_float64_never_goes_to_triton():
    reason = ATTENTION.impls["triton"].supports(device=torch.device("cuda"), dtype=torch.float64, head_dim=64,
                                                v_head_dim=64, explicit=False, q_len=8, kv_len=8, mask_kind=None)
    assert reason is not None and "torch" in reason


@pytest.mark.parametrize("arch", [None, "sm80", "sm86", "sm90", "sm100", "sm120"])
@pytest.mark.parametrize("dims,ships,ships_padded", [
    ((16, 16), True, True), ((24, 24), True, True), ((32, 32), True, True), ((48, 48), True, True),
    ((64, 64), True, True), ((64, 32), True, True), ((40, 40), False, True), ((64, 56), False, True),
    ((33, 17), False, True), ((80, 80), False, False), ((128, 128), False, False), ((64, 72), False, False)])
def test_float32_triton_head_dims(monkeypatch, arch, dims, ships, ships_padded):
    """float32 goes to Triton on CUDA only for the head dims whose tiles compile spill-free on sm_90a
    (<= 32, 48, 64); on sm90 / sm100, which run head dims zero-padded to their tile width, every head dim
    up to 64; on sm120 only up to 32 (its 48 / 64 tangent backward tiles spill). A CUDA device on a host
    without one (arch None) takes the rule of the families that do not pad."""
    from flowmap_kernels.attention import registry
    monkeypatch.setattr(registry, "cuda_arch_family", lambda device: arch)
    reason = ATTENTION.impls["triton"].supports(device=torch.device("cuda"), dtype=torch.float32, head_dim=dims[0],
                                                v_head_dim=dims[1], explicit=False, q_len=8, kv_len=8, mask_kind=None)
    expected = ships_padded if arch in ("sm90", "sm100") else ships and (arch != "sm120" or max(dims) <= 32)
    assert (reason is None) == expected, reason
    if not expected:
        assert "'torch' backend" in reason and str(dims[0]) in reason and str(arch) in reason
    for dt in (torch.float16, torch.bfloat16):  # 16-bit inputs ship for every head dim up to 256
        assert ATTENTION.impls["triton"].supports(device=torch.device("cuda"), dtype=dt, head_dim=dims[0],
                                                  v_head_dim=dims[1], explicit=False) is None


def test_registry_resolution_order_and_reasons():
    reg = OpRegistry("toy", auto_order=("triton", "torch"))
    reg.register("triton", "T", supports=lambda explicit=False, **p: None if p["ok"] else "not ok")
    reg.register("torch", "P")
    assert reg.resolve("auto", ok=True).impl == "T"
    assert reg.resolve("auto", ok=False).impl == "P"
    with pytest.raises(BackendUnavailableError, match="toy: backend 'triton' cannot run this call: not ok"):
        reg.resolve("triton", ok=False)
    reg.register("extension", "E", available=lambda: False)
    with pytest.raises(BackendUnavailableError, match="not available"):
        reg.resolve("extension", ok=True)
    with pytest.raises(ValueError):
        reg.register("auto", "X")


def test_build_info_reports_backends():
    info = fk.build_info()
    assert info["torch"] == torch.__version__
    assert "torch" in info["backends"]["attention"] and "naive" in info["backends"]["attention"]
    for key in ("cpu_extension", "cuda_extension_built", "cuda_archs", "triton", "version"):
        assert key in info
    assert set(info["backends"]) >= {"attention", "modulated_layer_norm", "rms_norm", "gelu_tanh",
                                     "gated_residual", "linear"}
