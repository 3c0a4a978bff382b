"""`mmfusion quantize` on a fusion model folder (a MultiModalModel): the one-graph ONNX export of
`export.export_fusion_onnx`, its fp32 check, ONNX Runtime dynamic INT8 quantization, and the size and
max |logit difference| of the int8 graph against fp32 PyTorch (on `export.fusion_check_inputs`: every
modality absent from some rows), next to the largest fp32 |logit| for scale. `--method torchao` first reports torchao int8 weight-only on a copy of the
PyTorch model (in memory: its int8 tensors cannot be saved). The moe fusion cannot be exported (ConfigError).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .export import (
    FusionGraph,
    export_fusion_onnx,
    fusion_check_inputs,
    fusion_example_inputs,
    verify_fusion_onnx,
)
from .quantize import TORCHAO_SAVE_NOTE, quantize_onnx, quantize_torchao_int8, tensor_bytes


def torchao_logit_diff(model: nn.Module, batch: int = 5, seed: int = 1) -> tuple[int, int, float]:
    """torchao int8 weight-only on a copy of the fusion model: (bytes before, bytes after, max |logit diff|)."""
    q = quantize_torchao_int8(copy.deepcopy(model).cpu().eval())
    inputs = fusion_example_inputs(model, batch=batch, seed=seed)
    with torch.no_grad():
        ref = FusionGraph(copy.deepcopy(model).cpu().eval())(*inputs)
        got = FusionGraph(q)(*inputs)
    return tensor_bytes(model), tensor_bytes(q), float((got - ref).abs().max())


def quantize_fusion(
    model: nn.Module, out_dir: str | Path, method: str = "onnx", log: Callable[[str], None] = print
) -> dict[str, Path]:
    """Write fusion_model.onnx and fusion_model.int8.onnx into `out_dir`, logging the checks; returns both paths."""
    if method == "torchao":
        before, after, diff = torchao_logit_diff(model)
        log(f"torchao int8 weight-only: {before / 1024:.1f} KB -> {after / 1024:.1f} KB in memory")
        log(f"fusion model torchao int8: max |logit - fp32| = {diff:.2e}")
        log(f"note: {TORCHAO_SAVE_NOTE}")
        log(f"writing the ONNX int8 files to {out_dir} instead")
    fp32 = export_fusion_onnx(model, out_dir)
    log(f"fusion model: {fp32}")
    log(f"fusion model: max |onnxruntime - PyTorch| = {verify_fusion_onnx(model, fp32):.2e}")
    int8 = quantize_onnx({"fusion": fp32})["fusion"]
    a, b = fp32.stat().st_size, int8.stat().st_size
    log(f"fusion model int8: {int8}")
    log(f"fusion model size: fp32 {a / 1024:.1f} KB -> int8 {b / 1024:.1f} KB ({b / a:.2f}x)")
    with torch.no_grad():
        scale = float(FusionGraph(copy.deepcopy(model).cpu().eval())(*fusion_check_inputs(model)).abs().max())
    log(
        f"fusion model int8 ONNX: max |logit - fp32 PyTorch| = {verify_fusion_onnx(model, int8):.2e} "
        f"(fp32 max |logit| = {scale:.2e})"
    )
    return {"fp32": fp32, "int8": int8}


__all__ = ["quantize_fusion", "torchao_logit_diff"]
