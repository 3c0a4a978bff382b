"""Model compression for serving (I2): INT8 quantization and global magnitude pruning.

* `quantize_onnx`: ONNX Runtime dynamic quantization of the exported encoders — int8 weights (QInt8,
  per tensor), activations quantized on the fly per batch; the maintained CPU path for Transformers.
* `quantize_torchao_int8`: torchao int8 weight-only quantization of the PyTorch model in place.
* `prune_model`: global L1 unstructured pruning of Linear weights (torch.nn.utils.prune), made permanent.

Nothing here fine-tunes: pruning a trained model usually costs accuracy that only retraining recovers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from torch.nn.utils import prune

from ..errors import CheckpointError, ConfigError
from .export import require


def int8_path(path: Path) -> Path:
    """text_encoder.onnx -> text_encoder.int8.onnx"""
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def quantize_onnx(paths: dict[str, Path], out_dir: str | Path | None = None) -> dict[str, Path]:
    """Dynamically quantize each exported encoder to int8 weights; returns {"text", "image"} -> int8 path.

    Each file is first pre-processed as ONNX Runtime recommends (graph optimisation and ONNX shape
    inference; its symbolic shape inference is skipped: it cannot resolve the exporter's dynamic
    length slicing). Files go to `out_dir` (default: beside the fp32 files) as `<name>.int8.onnx`.
    """
    require("onnx", "onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = {}
    for name, src in paths.items():
        src = Path(src)
        if not src.is_file():
            raise CheckpointError(f"ONNX file {src} not found: run export_onnx first")
        dst = int8_path(Path(out_dir) / src.name if out_dir is not None else src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        prepared = dst.with_name(f"{src.stem}.prep{src.suffix}")
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" advice: done above
        try:
            quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(level)
            prepared.unlink(missing_ok=True)
        out[name] = dst
    return out


def quantize_torchao_int8(model: nn.Module) -> nn.Module:
    """torchao int8 weight-only quantization of every nn.Linear, in place (activations stay float)."""
    require("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig())
    return model


def prune_model(
    model: nn.Module, sparsity: float, modules: type[nn.Module] | Sequence[type[nn.Module]] = nn.Linear
) -> float:
    """Zero the `sparsity` fraction of smallest-|w| weights, ranked globally over the `weight` of every
    module of the given type(s) (Zhu & Gupta 2017, global magnitude pruning), in place and permanent
    (no mask or re-parametrisation is left). Returns the achieved sparsity over those weights.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ConfigError(f"sparsity is {sparsity}; expected a fraction in [0, 1]")
    kinds = tuple(modules) if isinstance(modules, Sequence) else (modules,)
    targets = [
        (m, "weight")
        for m in model.modules()
        if isinstance(m, kinds) and getattr(m, "weight", None) is not None
    ]
    if not targets:
        names = ", ".join(k.__name__ for k in kinds)
        raise ConfigError(f"the model has no {names} module with a weight to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    for module, name in targets:
        prune.remove(module, name)
    return weight_sparsity(model, kinds)


def weight_sparsity(
    model: nn.Module, modules: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear
) -> float:
    """Fraction of exactly-zero entries over the `weight` of every module of the given type(s)."""
    weights = [
        m.weight for m in model.modules() if isinstance(m, modules) and getattr(m, "weight", None) is not None
    ]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0
