"""Metadata attached to every benchmark result: versions, device, GPU details through NVML."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

from ..info import module_version

__all__ = ["metadata", "nvml_info"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def nvml_info(index: int = 0) -> dict:
    """GPU name, memory, clocks and driver from nvidia-ml-py; {"nvml": "unavailable: <reason>"} without
    a GPU or driver (pynvml.nvmlInit raises NVMLError_LibraryNotFound on a machine with none)."""
    try:
        import pynvml
    except Exception as e:  # nvidia-ml-py not installed
        return {"nvml": f"unavailable: {type(e).__name__}"}
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return {"nvml": f"unavailable: {type(e).__name__}"}
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(index)

        def dec(v):
            return v.decode() if isinstance(v, bytes) else v

        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        info = {"nvml": "ok", "gpu_name": dec(pynvml.nvmlDeviceGetName(h)),
                "gpu_memory_total_bytes": int(mem.total),
                "driver_version": dec(pynvml.nvmlSystemGetDriverVersion())}
        for key, clk in (("sm", pynvml.NVML_CLOCK_SM), ("mem", pynvml.NVML_CLOCK_MEM)):
            try:
                info[f"clock_{key}_mhz"] = int(pynvml.nvmlDeviceGetClockInfo(h, clk))
                info[f"clock_{key}_max_mhz"] = int(pynvml.nvmlDeviceGetMaxClockInfo(h, clk))
            except Exception:
                pass
        try:
            info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0
        except Exception:
            pass
        return info
    except Exception as e:
        return {"nvml": f"error: {type(e).__name__}: {e}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def metadata(device) -> dict:
    """Versions (torch, triton, python), device, CPU model and threads, git commit, time; NVML on CUDA."""
    device = torch.device(device)
    m = {"torch": torch.__version__, "triton": module_version("triton"), "numpy": module_version("numpy"),
         "python": platform.python_version(), "platform": platform.platform(), "device": str(device),
         "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
         "git_commit": _git_commit(),
         "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        m["cuda_device_name"] = torch.cuda.get_device_name(idx)
        m["cuda_runtime"] = torch.version.cuda
        m.update(nvml_info(idx))
    else:
        m.update({"nvml": "skipped: not a CUDA device"})
    return m
