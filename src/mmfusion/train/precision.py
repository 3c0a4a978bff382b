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


def cpu_has_amx() -> bool:
    """True on CPUs with AMX tiles (e.g. Xeon Sapphire Rapids), where bf16 autocast clearly beats fp32."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA GPUs with bf16 (else fp16), bf16 on CPUs with AMX, fp32 on other CPUs.

    Measured with `make bench-precision` (benchmarks/step_variants.py --variants bf16) on an AMD EPYC with
    AVX2 only: a bf16 matmul is ~100x slower than fp32 and bf16 autocast trains the quickstart model ~12x
    slower (8.2 vs 100.7 samples/s, 1 thread). With AVX512-BF16 but no AMX, bf16 autocast was within noise
    of fp32 (benchmarks/train_throughput.py: 326 vs 302 samples/s, separate runs; docs/benchmarks.md), so
    `auto` keeps fp32 there too.

    fp16 on CPU is refused: there is no dynamic loss scaling path for it here.
    """
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
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


def environment_lines() -> list[str]:
    """What `mmfusion info` prints without a path: Python / torch / threads, CPU capability, CUDA, precision."""
    import sys

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    return [
        f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}",
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}",
        f"cuda: {cuda}",
        f"train.precision=auto resolves to {resolve_precision('auto', device)} on {device}",
    ]
