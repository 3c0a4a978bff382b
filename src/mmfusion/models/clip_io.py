"""Import CLIP checkpoints as mmfusion two-tower models, and export them back (issue 16, item 2).

Import: a local HF `CLIPModel` folder (config.json with model_type clip, model.safetensors [sharded] or
pytorch_model.bin, a CLIP tokenizer: tokenizer.json or vocab.json + merges.txt, preprocessor_config.json),
or an OpenCLIP state dict (.safetensors; .bin / .pt / .pth read with torch.load(weights_only=True), never
unpickled) with its optional open_clip_config.json and a CLIP tokenizer folder. The result is a
ContrastiveModel with text.arch clip whose embeddings equal the source library's (tests: 1e-5).

Export: a text.arch clip model -> an HF CLIPModel folder (`CLIPModel.from_pretrained` / `CLIPTokenizer` /
`CLIPImageProcessor` load it) or an OpenCLIP folder (open_clip_model.safetensors + open_clip_config.json +
tokenizer.json, the layout of OpenCLIP's hub repositories).

Images: the imported image tower normalises with the checkpoint's image_mean / image_std itself
(ImageConfig.mean / std), so `encode_image` takes what every mmfusion model takes (PIL images, uint8 arrays,
or [-1, 1] tensors). Resizing is mmfusion's (bilinear to image_size x image_size), not CLIPImageProcessor's
(bicubic shortest side + centre crop): for the checkpoint's exact preprocessing, crop and resize the images
yourself to image_size first (then mmfusion only converts and normalises).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from ..errors import ConfigError
from ..modalities.clip_tokenizer import BOS, EOS, ClipTokenizer
from .clip_interop import (
    SUPPORTED,
    config_from_hf,
    config_from_openclip,
    config_to_hf,
    config_to_openclip,
    hf_to_openclip,
    image_normalisation,
    mmfusion_to_openclip,
    openclip_to_hf,
    openclip_to_mmfusion,
    require_clip_arch,
)
from .contrastive import ContrastiveModel

StateDict = dict[str, torch.Tensor]
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


# ---- reading -----------------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> StateDict:
    """A state dict from .safetensors, or from .bin / .pt / .pth through torch.load(weights_only=True)
    (tensors and plain containers only; a training checkpoint's {"state_dict": ...} is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: expected a state dict (.safetensors, .bin, .pt)")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in PICKLE_SUFFIXES:
        raise ConfigError(
            f"{path}: unknown state-dict format {path.suffix!r}; expected .safetensors, .bin or .pt"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ConfigError(f"{path}: cannot read it with torch.load(weights_only=True): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


def _hf_weights(folder: Path) -> StateDict:
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in load_file(str(folder / s)).items()}
    if (folder / "pytorch_model.bin").is_file():
        return read_state_dict(folder / "pytorch_model.bin")
    raise ConfigError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _special_token(folder: Path, name: str) -> str | None:
    """`name` (e.g. pad_token) from tokenizer_config.json / special_tokens_map.json, if either sets it."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if path.is_file():
            value = json.loads(path.read_text()).get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                return value
    return None


def load_clip_tokenizer(
    folder: str | Path, context_length: int, vocab_size: int | None = None
) -> ClipTokenizer:
    """The CLIP tokenizer of an HF folder: tokenizer.json, or vocab.json + merges.txt (through transformers'
    CLIPTokenizer); its pad token from tokenizer_config.json."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
    else:
        raise ConfigError(f"{folder}: no CLIP tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    pad = _special_token(folder, "pad_token")
    if pad is not None and tok.token_to_id(pad) is not None:
        tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)
    return ClipTokenizer(tok, context_length, vocab_size)


def _load_strict(model: ContrastiveModel, state: StateDict, source: str) -> ContrastiveModel:
    """Load `state` into `model`; ConfigError naming missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        raise ConfigError(
            f"{source}: the weights do not fit a CLIP model (missing {missing[:4]}, unexpected {extra[:4]}, "
            f"shapes {shapes[:2]}); {SUPPORTED}"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


# ---- import ------------------------------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """'hf' for an HF CLIPModel folder, 'openclip' for a state-dict file or an OpenCLIP folder."""
    path = Path(path)
    if path.is_file():
        return "openclip"
    if not path.is_dir():
        raise ConfigError(
            f"{path} not found: pass an HF CLIPModel folder or an OpenCLIP state dict (.safetensors, .bin, .pt)"
        )
    if any((path / f).is_file() for f in OPENCLIP_WEIGHTS):
        return "openclip"
    if (path / "config.json").is_file():
        return "hf"
    raise ConfigError(
        f"{path}: neither an HF CLIPModel folder (config.json + model.safetensors) nor an OpenCLIP folder "
        f"({' / '.join(OPENCLIP_WEIGHTS)})"
    )


def import_hf_clip(folder: str | Path) -> ContrastiveModel:
    """An HF CLIPModel folder -> ContrastiveModel (text.arch clip, the folder's tokenizer and image mean/std)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder}/config.json not found: not an HF CLIPModel folder")
    hf = json.loads((folder / "config.json").read_text())
    pre_path = folder / "preprocessor_config.json"
    pre = json.loads(pre_path.read_text()) if pre_path.is_file() else None
    config = config_from_hf(hf, pre)
    tokenizer = load_clip_tokenizer(folder, config.text.context_length, config.text.vocab_size)
    state = openclip_to_mmfusion(hf_to_openclip(_hf_weights(folder)))
    return _load_strict(ContrastiveModel(config, tokenizer), state, str(folder))


def import_openclip(
    path: str | Path, config: str | Path | dict[str, Any] | None = None, tokenizer: str | Path | None = None
) -> tuple[ContrastiveModel, list[str]]:
    """An OpenCLIP state dict (a file, or a folder holding open_clip_model.safetensors) -> (ContrastiveModel,
    the assumptions made where no config said: see config_from_openclip).

    config: open_clip_config.json (or its dict; default: the one beside the weights, if any).
    tokenizer: a folder with a CLIP tokenizer (default: the folder of the weights)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in OPENCLIP_WEIGHTS if (path / f).is_file()]
        if not found:
            raise ConfigError(f"{path}: no {' or '.join(OPENCLIP_WEIGHTS)}")
        path = found[0]
    state = openclip_to_mmfusion(read_state_dict(path))
    if config is None and (path.parent / "open_clip_config.json").is_file():
        config = path.parent / "open_clip_config.json"
    if isinstance(config, (str, Path)):
        if not Path(config).is_file():
            raise ConfigError(f"OpenCLIP config {config} not found")
        config = json.loads(Path(config).read_text())
    model_config, assumed = config_from_openclip(state, config)
    tok_dir = Path(tokenizer) if tokenizer is not None else path.parent
    tok = load_clip_tokenizer(tok_dir, model_config.text.context_length, model_config.text.vocab_size)
    oc = config or {}
    text_cfg = oc.get("model_cfg", oc).get("text_cfg") or {}
    if text_cfg.get("pool_type", "argmax") == "argmax" and tok.eot_id != tok.tokenizer.get_vocab_size() - 1:
        raise ConfigError(
            f"{tok_dir}: OpenCLIP pools at the largest token id (argmax), but {EOS} is id {tok.eot_id}, not the "
            "tokenizer's last id: this tokenizer does not belong to the checkpoint"
        )
    if (
        text_cfg.get("pool_type") == "eos" and text_cfg.get("eos_id", 2) != tok.eot_id
    ):  # 2: OpenCLIP's default
        raise ConfigError(
            f"text_cfg.eos_id {text_cfg.get('eos_id', 2)} is not the tokenizer's {EOS} ({tok.eot_id})"
        )
    return _load_strict(ContrastiveModel(model_config, tok), state, str(path)), assumed


def import_clip(
    path: str | Path,
    fmt: str | None = None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[ContrastiveModel, list[str]]:
    """`import_hf_clip` or `import_openclip` by `fmt` ('hf' | 'openclip'; None: detect_format)."""
    fmt = fmt or detect_format(path)
    if fmt == "hf":
        if config is not None or tokenizer is not None:
            raise ConfigError(
                "--config and --tokenizer are for OpenCLIP state dicts; an HF folder has its own"
            )
        return import_hf_clip(path), []
    if fmt == "openclip":
        return import_openclip(path, config, tokenizer)
    raise ConfigError(f"unknown format {fmt!r}; expected hf or openclip")


# ---- export ------------------------------------------------------------------------------------------------
def _weights(model: ContrastiveModel) -> StateDict:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        k: v for k, v in state.items() if k.startswith(("text_encoder.", "image_encoder.", "logit_scale"))
    }


def _preprocessor(model: ContrastiveModel) -> dict[str, Any]:
    mean, std = image_normalisation(model.config)
    size = model.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def _tokenizer_of(model: ContrastiveModel) -> ClipTokenizer:
    tok = model.tokenizer
    if not isinstance(tok, ClipTokenizer):
        raise ConfigError("the model's tokenizer is not a CLIP tokenizer (text.arch clip needs one)")
    return tok


def export_hf_clip(model: ContrastiveModel, out: str | Path) -> Path:
    """A text.arch clip model -> an HF CLIPModel folder: config.json, model.safetensors, the CLIP tokenizer
    (CLIPTokenizer files) and preprocessor_config.json (the model's image mean / std, resize to image_size)."""
    require_clip_arch(model.config, "HF CLIP")
    tok = _tokenizer_of(model)
    try:
        from transformers import CLIPConfig, CLIPTokenizer
    except ImportError as e:
        raise ImportError(f"export to HF CLIP needs transformers (pip install transformers): {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    CLIPConfig(**config_to_hf(model.config, tok.bos_id, tok.eot_id, tok.pad_id)).save_pretrained(out)
    state = openclip_to_hf(mmfusion_to_openclip(_weights(model)))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    bpe = json.loads(tok.tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    pad = tok.tokenizer.id_to_token(tok.pad_id)
    CLIPTokenizer(
        vocab=bpe["vocab"], merges=merges, pad_token=pad, unk_token=EOS, bos_token=BOS
    ).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_preprocessor(model), indent=2))
    return out


def export_openclip(model: ContrastiveModel, out: str | Path) -> Path:
    """A text.arch clip model -> an OpenCLIP folder: open_clip_model.safetensors (open_clip.CLIP keys),
    open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and the CLIP tokenizer.json."""
    tok = _tokenizer_of(model)
    cfg = config_to_openclip(model.config, tok.eot_id, tok.tokenizer.get_vocab_size() - 1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        mmfusion_to_openclip(_weights(model)), str(out / OPENCLIP_WEIGHTS[0]), metadata={"format": "pt"}
    )
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(out)
    return out


__all__ = [
    "detect_format",
    "export_hf_clip",
    "export_openclip",
    "import_clip",
    "import_hf_clip",
    "import_openclip",
    "load_clip_tokenizer",
    "read_state_dict",
]
