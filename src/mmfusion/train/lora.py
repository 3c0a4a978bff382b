"""LoRA fine-tuning of chosen Linear layers through Hugging Face `peft` (T4).

LoRA (Hu et al. 2021, arXiv:2106.09685) adds a trainable low-rank update to a frozen weight:
y = W x + b + (alpha / r) * B A x, with A (r, in) Kaiming-initialised and B (out, r) zero-initialised, so
an adapted model starts out computing exactly what the base model computes.

`peft` fits our plain `nn.Module`s without a wrapper model: `inject_adapter_in_model` swaps each
targeted `nn.Linear` for a `peft` LoRA layer in place (the model keeps its class and methods), freezes
every other parameter, and `get_peft_model_state_dict` / `set_peft_model_state_dict` give the adapter
weights alone. Two things are ours: which modules a pattern names (we resolve patterns to full module
names first, so a pattern matching nothing fails with an error naming it instead of peft's generic
message), and merging, which calls each LoRA layer's own `merge()` and puts its base `nn.Linear` back.

Adapter folders use peft's layout: `adapter_config.json` + `adapter_model.safetensors`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # peft imports transformers (~3 s), so it is imported only when LoRA is used
    from peft.tuners.tuners_utils import BaseTunerLayer

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _lora_layers(model: nn.Module) -> dict[str, BaseTunerLayer]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _matches(pattern: str, name: str) -> bool:
    """A pattern names a module by its full dotted name, a dotted suffix of it, or a regex full match."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as e:
        raise ConfigError(
            f"LoRA target pattern {pattern!r} is neither a module name nor a valid regex: {e}"
        ) from None


def _adaptable(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layers, weight stored transposed), which peft adapts."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def resolve_targets(model: nn.Module, target: list[str]) -> list[str]:
    """Full names of the `nn.Linear` (or GPT-2 Conv1D) modules that the patterns in `target` name, in model
    order.

    Raises ConfigError naming every pattern that matches no Linear layer.
    """
    if isinstance(target, str) or not target:
        raise ConfigError(f"LoRA target must be a non-empty list of module-name patterns, got {target!r}")
    linears = [name for name, m in model.named_modules() if _adaptable(m)]
    unmatched = [p for p in target if not any(_matches(p, n) for n in linears)]
    if unmatched:
        suffixes = sorted({re.sub(r"^.*blocks\.\d+\.", "", n) for n in linears})
        raise ConfigError(
            f"LoRA target pattern(s) {unmatched} match no nn.Linear module; "
            f"Linear modules look like {suffixes[:12]} (full names or dotted suffixes, or a regex "
            "matching the whole name)"
        )
    return [n for n in linears if any(_matches(p, n) for p in target)]


def apply_lora(
    model: nn.Module,
    target: list[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    verbose: bool = True,
) -> nn.Module:
    """Add LoRA adapters (rank `r`, scale alpha / r) to the Linear layers `target` names; freeze the rest.

    `target` holds patterns such as "attn.qkv", "mlp.fc1" (dotted suffixes of module names) or
    r"image_encoder\\..*\\.attn\\.out" (regex matching a whole name). The model is changed in place and
    returned; with `verbose` the trainable-parameter count and fraction are printed.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if _lora_layers(model):
        raise ValueError("model already has LoRA adapters; merge_lora(model) or start from the base model")
    if r < 1:
        raise ConfigError(f"LoRA rank r must be >= 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"LoRA dropout must be in [0, 1), got {dropout}")
    names = resolve_targets(model, target)
    conv1d = any(not isinstance(model.get_submodule(n), nn.Linear) for n in names)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=names,
        bias="none",
        fan_in_fan_out=conv1d,  # Conv1D stores (in, out) weights
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # peft also matches targets as dotted suffixes; a full name can be a suffix only of a deeper copy of itself
    if sorted(_lora_layers(model)) != sorted(names):
        raise RuntimeError(f"peft adapted {sorted(_lora_layers(model))}, expected exactly {sorted(names)}")
    if verbose:
        trainable, total, fraction = lora_summary(model)
        print(
            f"LoRA r={r} alpha={alpha} on {len(names)} Linear layers: "
            f"trainable {trainable:,} / {total:,} parameters ({100 * fraction:.4f}%)"
        )
    return model


def lora_summary(model: nn.Module) -> tuple[int, int, float]:
    """(trainable parameters, all parameters, trainable / all) of any model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, trainable / total if total else 0.0


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write only the LoRA weights (safetensors) and their config into `directory`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not _lora_layers(model):
        raise ValueError("model has no LoRA adapters to save; call apply_lora first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER_NAME].save_pretrained(str(directory))
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load adapters written by `save_adapters` into `model`: a base model (adapters are added first,
    with the saved rank, scale and targets) or one already adapted on the same layers."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / f).is_file():
            raise CheckpointError(f"{directory / f} not found: not a saved LoRA adapter folder")
    state = load_file(str(directory / WEIGHTS_FILE))
    if not _lora_layers(model):
        config = LoraConfig.from_pretrained(str(directory))
        missing_targets = [n for n in config.target_modules if n not in dict(model.named_modules())]
        if missing_targets:
            raise CheckpointError(
                f"{directory}: adapter targets {missing_targets[:5]} are not modules of this model"
            )
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE}: missing adapter keys {missing[:5]}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += alpha / r * B A) and put the plain nn.Linear back.

    Returns the same model object, now without LoRA modules; its state_dict has the base model's keys.
    Parameters keep the requires_grad that apply_lora left them (all frozen): unfreeze what you train next.
    """
    for name, layer in _lora_layers(model).items():
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
