"""Device and numeric-precision choices shared by training, evaluation and sampling."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from loopmdm.errors import require


def resolve_device(name: str) -> torch.device:
    """'auto' = CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    require(name != "cuda" or torch.cuda.is_available(), f"device '{name}' was asked for but no CUDA device is available")
    return torch.device(name)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when asked for, or for 'auto' on a CUDA device that supports it.
    (On CPU 'auto' stays fp32: bf16 speed there depends on the processor; presets opt in.)"""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def configure_matmul_precision(device: torch.device, precision: str) -> bool:
    """TF32 tensor cores for the float32 matmuls and convolutions left on a CUDA device (under
    bf16 autocast: the fp32 islands; under 'auto' on a GPU without bf16: everything). Not for
    train.precision=fp32, which asks for full fp32, nor on CPU. Process-wide; returns whether
    it was switched on."""
    if device.type != "cuda" or precision == "fp32":
        return False
    # "high" = TF32 on CUDA; it sets torch >= 2.9's fp32_precision and keeps the legacy
    # allow_tf32 flags readable (setting fp32_precision directly makes reading them raise).
    # cuDNN convolutions already default to TF32.
    torch.set_float32_matmul_precision("high")
    return True


def describe_machine(device: torch.device | None = None) -> str:
    """One line naming what a measurement ran on: the CUDA device, or the CPU model and the
    threads torch uses (results must say where they were measured)."""
    import os
    import platform

    if device is not None and device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
