"""What a bench figure was measured on: the CPU, the kernels torch picked for it, whether bf16
runs natively (without AVX512-BF16 or AMX, bf16 matmuls are emulated and slower than float32), and
whether a bf16 run's few-row products and decoder layers ran mossserve's own CPU kernels (layers/cpu_kernels.py)."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..layers.cpu_kernels import bf16_kernels
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
    resolved = parse_dtype(dtype, device)
    return {
        "device": device,
        "dtype": str(resolved).removeprefix("torch."),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(device),
        "bf16_cpu_kernel": torch.device(device).type == "cpu" and resolved == torch.bfloat16
        and bf16_kernels() is not None,
    }
