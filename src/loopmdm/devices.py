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


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here (AVX512-BF16 / AMX). Without it bf16 is
    emulated: measured on a 2-core AMD EPYC without AVX-512, a 4096x256x1024 bf16 linear took
    0.18 s against 0.03 s in fp32 -- 6x slower, where a host with AVX512-BF16 ran `tiny` ~1.75x
    faster in bf16 than in fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast when asked for, or for 'auto' where bf16 is native: a CUDA device that
    supports it, or a CPU with AVX512-BF16 / AMX (elsewhere 'auto' stays fp32)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and (
        torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()))
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
