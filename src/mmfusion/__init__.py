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
    """Load a saved model folder (or a run directory's final model) — safetensors + JSON, nothing unpickled."""
    from pathlib import Path

    from .models.contrastive import ContrastiveModel

    path = Path(path)
    return ContrastiveModel.from_pretrained(path / "model" if (path / "model").is_dir() else path)


def __getattr__(name):
    # Lazy public names: `import mmfusion` stays cheap (no torch import until needed).
    if name == "ContrastiveModel":
        from .models.contrastive import ContrastiveModel

        return ContrastiveModel
    if name in ("MultiModalModel", "MultiModalTransformer", "MultiModalConfig", "missing_modality_eval"):
        from .models import multimodal

        return getattr(multimodal, name)
    if name in ("load_config", "RunConfig"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'mmfusion' has no attribute {name!r}")
