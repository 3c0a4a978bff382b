"""Model compression for serving (I2): INT8 quantization and global magnitude pruning.

* `quantize_onnx`: ONNX Runtime dynamic quantization of the exported encoders — int8 weights (QInt8,
  per tensor), activations quantized on the fly per batch; the maintained CPU path for Transformers.
* `quantize_torchao_int8`: torchao int8 weight-only quantization of the PyTorch model in place.
* `prune_model`: global L1 unstructured pruning of Linear weights (torch.nn.utils.prune), made permanent
  or (``permanent=False``) left as masks for `finetune_pruned`, which trains the masked model on its run's
  training data so pruned weights stay exactly zero; `make_permanent` then drops the masks.
* `onnx_cosine`: per-row cosine of ONNX (e.g. int8) embeddings to the fp32 PyTorch ones.

torchao int8 weights are tensor subclasses (`Int8Tensor`): safetensors cannot store them (save_pretrained
fails), so a torchao-quantized model stays in memory; the saved INT8 artefact is the ONNX one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

from ..errors import CheckpointError, ConfigError
from .export import compare_onnx, require

TORCHAO_SAVE_NOTE = (
    "torchao int8 weights are tensor subclasses that safetensors cannot store (save_pretrained fails), "
    "so a torchao-quantized model cannot be saved as a model folder"
)


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


def onnx_cosine(model: nn.Module, paths: dict[str, Path]) -> dict[str, float]:
    """Lowest per-row cosine similarity of the ONNX files' embeddings to the PyTorch model's, per encoder,
    on the random inputs of `export.compare_onnx` (several batch sizes and text lengths)."""
    emb = compare_onnx(model, paths)
    return {n: float(F.cosine_similarity(e["onnx"], e["torch"], dim=1).min()) for n, e in emb.items()}


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the parameters and buffers, counting a tensor subclass (a torchao int8 weight) by
    its inner tensors (int8 data + scales)."""

    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    return sum(size(t) for t in [*model.parameters(), *model.buffers()])


def prune_model(
    model: nn.Module,
    sparsity: float,
    modules: type[nn.Module] | Sequence[type[nn.Module]] = nn.Linear,
    permanent: bool = True,
) -> float:
    """Zero the `sparsity` fraction of smallest-|w| weights, ranked globally over the `weight` of every
    module of the given type(s) (Zhu & Gupta 2017, global magnitude pruning), in place. Permanent by
    default (no mask or re-parametrisation is left); with `permanent=False` each pruned module keeps
    torch.nn.utils.prune's `weight_orig` parameter and `weight_mask` buffer (weight = orig * mask), for
    `finetune_pruned`. Returns the achieved sparsity over those weights.
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
    if permanent:
        make_permanent(model)
    return weight_sparsity(model, kinds)


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold every torch.nn.utils.prune mask into its weight (weight = orig * mask) and drop the mask,
    the `_orig` parameter and the hook: plain parameters, the state-dict keys of the unpruned model."""
    for module in model.modules():
        hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for hook in hooks:
            prune.remove(module, hook._tensor_name)
    return model


def finetune_pruned(model: nn.Module, cfg, steps: int, work_dir: str | Path, log=print) -> dict[str, float]:
    """Train a model pruned with `prune_model(..., permanent=False)` for `steps` optimizer steps on its run's
    image–text training split, with the run's train config (lr, batch size, precision, device; warm-up
    capped at `steps`, no stages, one checkpoint at the end in `work_dir`). The masks stay attached, so the
    pruned weights stay exactly zero (their `_orig` entries get no gradient and are multiplied by 0).
    Returns the Trainer's last logged metrics; the masks are still there: call `make_permanent` next.
    """
    from ..run import load_split, model_collate, train_data
    from ..train.rng import seed_everything
    from ..train.trainer import Trainer

    if steps < 1:
        raise ConfigError(f"fine-tuning steps = {steps}: expected a positive number")
    if not prune.is_pruned(model):
        raise ConfigError("the model has no pruning masks: prune it with prune_model(..., permanent=False)")
    if cfg.kind != "contrastive" or cfg.model.probe is not None:
        raise ConfigError(
            "fine-tuning after pruning supports image–text contrastive runs only (no fusion/probe)"
        )
    cfg = cfg.model_copy(update={"model": model.config})  # the image size and tokenizer of the model
    train_cfg = cfg.train.model_copy(
        update={
            "steps": steps,
            "stages": None,
            "warmup_steps": min(cfg.train.warmup_steps, steps),
            "checkpoint_every": steps,
            "keep_checkpoints": 1,
            "eval_every": 0,
            "log_every": min(cfg.train.log_every, steps),
        }
    )
    seed_everything(cfg.seed)
    data = train_data(cfg, load_split(cfg, "train"), model_collate(cfg, model), train_cfg.batch_size)
    last = Trainer(model, data, train_cfg, work_dir, log=log).fit()
    model.cpu().eval()
    return last


def weight_sparsity(
    model: nn.Module, modules: type[nn.Module] | tuple[type[nn.Module], ...] = nn.Linear
) -> float:
    """Fraction of exactly-zero entries over the `weight` of every module of the given type(s) (with a
    pruning mask attached: of weight_orig * weight_mask, the weight the next forward uses)."""
    weights = [
        m.weight_orig * m.weight_mask if hasattr(m, "weight_mask") else m.weight
        for m in model.modules()
        if isinstance(m, modules) and getattr(m, "weight", None) is not None
    ]
    total = sum(w.numel() for w in weights)
    return float(sum(int((w == 0).sum()) for w in weights) / total) if total else 0.0
