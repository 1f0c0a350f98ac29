"""What a bench figure was measured on: the CPU, the kernels torch picked for it, and whether bf16
runs natively (without AVX512-BF16 or AMX, bf16 matmuls are emulated and slower than float32)."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..loader import native_bf16, parse_dtype


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str, dtype: str) -> dict:
    """Fields every bench result carries beside its figures."""
    return {
        "device": device,
        "dtype": str(parse_dtype(dtype, device)).removeprefix("torch."),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
    }
