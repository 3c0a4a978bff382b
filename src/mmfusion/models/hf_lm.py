"""A decoder-only Hugging Face causal LM and its tokenizer from a local folder, offline (HF_HUB_OFFLINE=1,
local_files_only): the language model of the LLaVA-style captioner (mmfusion.models.vlm).

Errors name the config key that points at the folder: a missing folder, a folder without config.json or
tokenizer files, and architectures that are not decoder-only causal LMs (encoder-only BERT-style folders,
encoder-decoder T5-style folders).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def _offline() -> None:
    """No hub access: every transformers call below reads local files only; no progress bars on loading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()


def check_lm_folder(folder: str | Path, key: str = "model.lm.hf"):
    """The folder's transformers config, after checking it describes a decoder-only causal LM."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(
            f"{key} = {str(folder)!r}: no such folder; point it at a local transformers causal-LM folder "
            "(config.json, model.safetensors, tokenizer files), e.g. one written by save_pretrained"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key} = {str(folder)!r}: no config.json there; not a transformers model folder")
    _offline()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(
            f"{key} = {str(folder)!r}: transformers cannot read its config.json ({e})"
        ) from None
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        causal = False
    if not causal:
        raise ConfigError(
            f"{key} = {str(folder)!r}: unsupported architecture {config.model_type!r} "
            f"({', '.join(archs) or 'no architectures listed'}); a vlm model needs a decoder-only causal LM "
            "(e.g. Llama, Qwen2, GPT-2, Mistral, Phi: architectures ending in ForCausalLM / LMHeadModel)"
        )
    return config


def load_causal_lm(folder: str | Path, key: str = "model.lm.hf") -> tuple[Any, Any]:
    """(model in fp32, tokenizer) of a local causal-LM folder; ConfigError naming `key` when it cannot be used."""
    config = check_lm_folder(folder, key)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{key} = {str(folder)!r}: no usable tokenizer there (tokenizer.json / tokenizer_config.json): {e}"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"{key} = {str(folder)!r}: its tokenizer has no eos token; captions need one to end "
            "(set eos_token in tokenizer_config.json)"
        )
    if not any(Path(folder).glob("*.safetensors")):
        raise ConfigError(
            f"{key} = {str(folder)!r}: no *.safetensors weights there (pickled .bin weights are not loaded; "
            "convert them with transformers' save_pretrained)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), config=config, local_files_only=True, dtype=torch.float32, use_safetensors=True
    )
    return model, tokenizer


__all__ = ["check_lm_folder", "load_causal_lm"]
