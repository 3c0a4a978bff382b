"""The model-side settings of the `train:` section, applied to a run's freshly built model and undone before
it is saved; the same for the two-tower (`model:`) and the fusion (`task:` + `fusion_model:`) recipes.

`prepare_model`, before the Trainer (and before a distillation wrapper):
  1. `train.init_from`: the weights of a saved model folder (every tensor name and shape must match the run's
     model); the run also uses that folder's tokenizer (`init_tokenizer`);
  2. `train.lora`: LoRA adapters on the targeted nn.Linear layers (mmfusion.train.lora); every other
     parameter is frozen except those `train.lora.trainable` names;
  3. `train.grad_checkpointing`: every `layers.Transformer` stack recomputes its blocks in backward (T8).
`finish_model`, after training: the adapters are written to <run>/adapters (peft layout) and merged into their
base weights, so the run's model folder is a plain model that every command loads.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from ..layers import set_grad_checkpointing
from .config import LoraConfig, TrainConfig

ADAPTERS_DIR = "adapters"


def _init_folder(init_from: str) -> Path:
    """The model folder `train.init_from` names (a run directory means its model/ folder)."""
    path = Path(init_from)
    folder = path / "model" if (path / "model").is_dir() else path
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"train.init_from = {init_from!r}: no model.safetensors there; expected a save_pretrained model "
            "folder or a run directory"
        )
    return folder


def init_tokenizer(cfg: TrainConfig) -> Path | None:
    """The tokenizer.json of the `train.init_from` folder (the run must use it: token ids are the model's
    vocabulary); None without init_from or when that model has no tokenizer."""
    if not cfg.init_from:
        return None
    path = _init_folder(cfg.init_from) / "tokenizer.json"
    return path if path.is_file() else None


def load_init_weights(model: nn.Module, init_from: str) -> None:
    """Load the `init_from` folder's weights into `model`; ConfigError naming the first tensor that does not fit."""
    from safetensors.torch import load_file

    folder = _init_folder(init_from)
    state = load_file(str(folder / "model.safetensors"))
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} here"
            if wrong
            else f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
        raise ConfigError(
            f"train.init_from = {init_from!r}: its weights do not fit the run's model ({detail}); the run's "
            "model / fusion_model config must describe the same architecture"
        )
    model.load_state_dict(state)


def apply_run_lora(model: nn.Module, lora: LoraConfig, log: Callable[[str], None]) -> None:
    """`train.lora` on `model`: adapters on `targets`, everything else frozen but the `trainable` patterns."""
    from .lora import apply_lora, lora_summary

    try:
        apply_lora(model, lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, verbose=False)
    except ConfigError as e:
        raise ConfigError(f"train.lora.targets: {e}") from None
    names = [n for n, _ in model.named_parameters()]
    for pattern in lora.trainable:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConfigError(
                f"train.lora.trainable: pattern {pattern!r} matches no parameter (names look like "
                f"{', '.join(names[:3])}; fnmatch patterns such as 'head.*')"
            )
    for name, p in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in lora.trainable):
            p.requires_grad_(True)
    trainable, total, fraction = lora_summary(model)
    log(
        f"LoRA r={lora.r} alpha={lora.alpha} on {', '.join(lora.targets)}: trainable {trainable:,} / "
        f"{total:,} parameters ({100 * fraction:.2f}%)"
    )


def prepare_model(
    model: nn.Module, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print
) -> nn.Module:
    """Apply init_from (not on resume: the checkpoint holds every weight), LoRA and gradient checkpointing."""
    if cfg.init_from and not resume:
        load_init_weights(model, cfg.init_from)
        log(f"initialised from {cfg.init_from}")
    if cfg.lora is not None:
        if not cfg.init_from and not getattr(model, "pretrained_base", False):
            log("note: train.lora without train.init_from adapts a randomly initialised model")
        apply_run_lora(model, cfg.lora, log)
    if cfg.grad_checkpointing:
        n = set_grad_checkpointing(model, True)
        if n == 0:
            raise ConfigError(
                f"train.grad_checkpointing: {type(model).__name__} has no layers.Transformer stack to recompute"
            )
        log(f"gradient checkpointing on {n} Transformer stack(s)")
    return model


def finish_model(
    model: nn.Module, cfg: TrainConfig, run_dir: Path, log: Callable[[str], None] = print
) -> nn.Module:
    """Before save_pretrained: write the LoRA adapters to <run>/adapters and merge them (in place)."""
    if cfg.lora is None:
        return model
    from .lora import merge_lora, save_adapters

    path = save_adapters(model, Path(run_dir) / ADAPTERS_DIR)
    merge_lora(model)
    log(f"LoRA adapters: {path}; merged into the saved model")
    return model


__all__ = ["finish_model", "init_tokenizer", "load_init_weights", "prepare_model"]
