"""mmfusion: build, train, align, evaluate and serve multimodal models with PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model",
    "ContrastiveModel",
    "MultiModalModel",
    "MultiModalTransformer",
    "load_config",
    "RunConfig",
]


def load_model(path):
    """Load a saved model folder (or a run directory's final model), whichever kind it holds (its config.json
    says) — safetensors + JSON, nothing unpickled. A unified model folder gives a
    `mmfusion.unified.bundle.UnifiedBundle` (decoder + tokenizers), which generation and serving take."""
    import json
    from pathlib import Path

    from .errors import CheckpointError
    from .models.contrastive import ContrastiveModel
    from .models.multimodal import MultiModalModel
    from .models.vlm import VLMModel
    from .unified.bundle import UnifiedBundle, is_unified_folder

    path = Path(path)
    folder = path / "model" if (path / "model").is_dir() else path
    kinds = {
        "contrastive": ContrastiveModel,
        "multimodal": MultiModalModel,
        "unified": UnifiedBundle,
        "vlm": VLMModel,
    }
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        # a unified folder written before it had a config.json; else let from_pretrained name what is missing
        kind = "unified" if is_unified_folder(folder) else "contrastive"
    if kind not in kinds:
        raise CheckpointError(
            f"{folder}/config.json: unknown model_type {kind!r}; expected one of {sorted(kinds)}"
        )
    return kinds[kind].from_pretrained(folder)


def __getattr__(name):
    # Lazy public names: `import mmfusion` stays cheap (no torch import until needed).
    if name == "ContrastiveModel":
        from .models.contrastive import ContrastiveModel

        return ContrastiveModel
    if name in ("MultiModalModel", "MultiModalTransformer", "MultiModalConfig"):
        from .models import multimodal

        return getattr(multimodal, name)
    if name == "missing_modality_eval":
        from .eval.missing import missing_modality_eval

        return missing_modality_eval
    if name in ("load_config", "RunConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'mmfusion' has no attribute {name!r}")
