"""Precision policy (T6): resolve `auto`, build the autocast context and the fp16 loss scaler."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX); without them bf16 is ~100x slower."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA GPUs with bf16 (else fp16) and on CPUs with native bf16, fp32 on other CPUs.

    fp16 on CPU is refused: there is no dynamic loss scaling path for it here.
    """
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(
            "train.precision = 'fp16': fp16 training needs a CUDA device (dynamic loss scaling); "
            "use 'bf16' or 'fp32' on CPU"
        )
    return requested


def autocast(precision: str, device: torch.device):
    """Context manager running the forward pass in `precision` (no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaler; enabled only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
