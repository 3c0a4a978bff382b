"""Weight and config mapping between mmfusion's two-tower model and CLIP checkpoints (Radford et al. 2021).

Three layouts of the same network (a ViT with [CLS] + ln_pre + ln_post + bias-free projection; a causal text
Transformer pooled at <|endoftext|> with a final LayerNorm and a bias-free projection; pre-LN blocks; one
learnable logit scale):

  mmfusion   ContrastiveModel.state_dict(): fused qkv Linear per block, projections as Linear (out, in),
             logit_scale of shape (1,)
  OpenCLIP   open_clip.CLIP.state_dict(): nn.MultiheadAttention (in_proj_weight = [q; k; v], the same
             layout as mmfusion's qkv), projections as (in, out) matrices, logit_scale of shape ()
  HF         transformers.CLIPModel.state_dict(): separate q_proj / k_proj / v_proj, projections as Linear

mmfusion <-> OpenCLIP is renames and two transposes; HF <-> OpenCLIP adds the q/k/v split. HF <-> mmfusion
goes through OpenCLIP keys. Folder reading and writing: mmfusion.models.clip_io.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..errors import ConfigError
from .contrastive_config import ImageConfig, ModelConfig, TextConfig

# OpenAI's CLIP image normalisation (CLIPImageProcessor's and OpenCLIP's defaults)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# mmfusion's own [-1, 1] pixels, written as a CLIP normalisation: (x01 - 0.5) / 0.5 = x / 127.5 - 1
MMFUSION_MEAN = MMFUSION_STD = (0.5, 0.5, 0.5)

SUPPORTED = (
    "supported: CLIP ViT image towers (patch conv, [CLS], ln_pre, ln_post, bias-free projection) with the "
    "causal CLIP text transformer (pooled at <|endoftext|>), activations gelu / quick_gelu / gelu_pytorch_tanh, "
    "LayerNorm eps 1e-5: HF CLIPModel folders and OpenCLIP `CLIP` / `CustomTextCLIP` state dicts of that kind"
)

# HF hidden_act <-> mmfusion act
HF_ACTS = {
    "gelu": "gelu",
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}
ACT_TO_HF = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}

StateDict = dict[str, torch.Tensor]


# ---- key renaming ------------------------------------------------------------------------------------------
def _rename(key: str, prefixes: list[tuple[str, str]], parts: list[tuple[str, str]]) -> str | None:
    """`key` with its first matching prefix replaced, then the block-part renames; None when no prefix fits."""
    for src, dst in prefixes:
        if key == src or (src.endswith(".") and key.startswith(src)):
            out = dst + key[len(src) :]
            for a, b in parts:
                out = out.replace(a, b)
            return out
    return None


def _swap(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(b, a) for a, b in pairs]


# mmfusion -> OpenCLIP (order matters: the first matching prefix wins)
_MM_OC_PREFIXES = [
    ("image_encoder.patch_embed.", "visual.conv1."),
    ("image_encoder.transformer.blocks.", "visual.transformer.resblocks."),
    ("image_encoder.", "visual."),
    ("text_encoder.transformer.blocks.", "transformer.resblocks."),
    ("text_encoder.token_embedding.", "token_embedding."),
    ("text_encoder.positional_embedding", "positional_embedding"),
    ("text_encoder.ln_final.", "ln_final."),
]
_MM_OC_PARTS = [
    (".attn.qkv.weight", ".attn.in_proj_weight"),
    (".attn.qkv.bias", ".attn.in_proj_bias"),
    (".attn.out.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]
_MM_OC_PROJ = {"image_encoder.proj.weight": "visual.proj", "text_encoder.proj.weight": "text_projection"}
# OpenCLIP -> mmfusion: explicit, so that keys of other architectures (layer scale, attention pooling ...) are
# left over and reported rather than renamed
_OC_MM_PREFIXES = [
    ("visual.conv1.", "image_encoder.patch_embed."),
    ("visual.transformer.resblocks.", "image_encoder.transformer.blocks."),
    ("visual.class_embedding", "image_encoder.class_embedding"),
    ("visual.positional_embedding", "image_encoder.positional_embedding"),
    ("visual.ln_pre.", "image_encoder.ln_pre."),
    ("visual.ln_post.", "image_encoder.ln_post."),
    ("transformer.resblocks.", "text_encoder.transformer.blocks."),
    ("token_embedding.", "text_encoder.token_embedding."),
    ("positional_embedding", "text_encoder.positional_embedding"),
    ("ln_final.", "text_encoder.ln_final."),
]

# HF -> OpenCLIP
_HF_OC_PREFIXES = [
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("logit_scale", "logit_scale"),
]
_HF_OC_PARTS = [
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.out_proj.", ".attn.out_proj."),
]
_HF_OC_PROJ = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(.*)\.attn\.in_proj_(weight|bias)$")
# OpenAI's original state dicts carry these ints as tensors; OpenCLIP drops them too
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _unmapped(kind: str, keys: list[str]) -> ConfigError:
    shown = ", ".join(sorted(keys)[:6]) + (" ..." if len(keys) > 6 else "")
    return ConfigError(f"unsupported {kind} architecture: no mmfusion counterpart for {shown}; {SUPPORTED}")


def mmfusion_to_openclip(state: StateDict) -> StateDict:
    """ContrastiveModel weights -> open_clip.CLIP weights (a probe head, if any, is left out)."""
    out: StateDict = {}
    for key, value in state.items():
        if key in _MM_OC_PROJ:
            out[_MM_OC_PROJ[key]] = value.t().contiguous()
        elif key == "logit_scale":
            out[key] = value.reshape(())
        else:
            new = _rename(key, _MM_OC_PREFIXES, _MM_OC_PARTS)
            if new is not None:
                out[new] = value
    return out


def openclip_to_mmfusion(state: StateDict) -> StateDict:
    """open_clip.CLIP (or CustomTextCLIP with a CLIP text transformer) weights -> ContrastiveModel weights.
    ConfigError naming the keys it cannot place (another architecture)."""
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _OPENAI_EXTRAS}
    if any(k.startswith(("text_model.", "vision_model.")) for k in state):
        raise ConfigError(
            "these are HF CLIPModel weights, not OpenCLIP's: import the HF folder they came from (with its "
            "config.json and tokenizer)"
        )
    # CustomTextCLIP keeps the text tower under "text." with the projection inside it
    state = {
        (k.removeprefix("text.") if k.startswith("text.") else k): v
        for k, v in state.items()
        if k not in ("attn_mask", "text.attn_mask")
    }
    proj = {v: k for k, v in _MM_OC_PROJ.items()}
    out: StateDict = {}
    left: list[str] = []
    for key, value in state.items():
        if key in proj:
            if value.ndim != 2:
                left.append(key)
                continue
            out[proj[key]] = value.t().contiguous()
        elif key == "logit_scale":
            out[key] = value.reshape(1)
        else:
            new = _rename(key, _OC_MM_PREFIXES, _swap(_MM_OC_PARTS))
            if new is None:
                left.append(key)
            else:
                out[new] = value
    if left:
        raise _unmapped("OpenCLIP", left)
    return out


def hf_to_openclip(state: StateDict) -> StateDict:
    """transformers.CLIPModel weights -> open_clip.CLIP weights (q/k/v projections fused into in_proj)."""
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    left: list[str] = []
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a buffer older transformers saved
        m = _QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif key in _HF_OC_PROJ:
            out[_HF_OC_PROJ[key]] = value.t().contiguous()
        else:
            new = _rename(key, _HF_OC_PREFIXES, _HF_OC_PARTS)
            if new is None:
                left.append(key)
            else:
                out[new] = value
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.append(f"{prefix}.self_attn.*_proj.{leaf}")
            continue
        block = _rename(prefix + ".", _HF_OC_PREFIXES, _HF_OC_PARTS)
        out[f"{block}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if left:
        raise _unmapped("HF CLIP", left)
    return out


def openclip_to_hf(state: StateDict) -> StateDict:
    """open_clip.CLIP weights -> transformers.CLIPModel weights (in_proj split into q / k / v)."""
    proj = {v: k for k, v in _HF_OC_PROJ.items()}
    prefixes, parts = _swap(_HF_OC_PREFIXES), _swap(_HF_OC_PARTS)
    out: StateDict = {}
    for key, value in state.items():
        m = _IN_PROJ.match(key)
        if m:
            block = _rename(m.group(1) + ".", prefixes, parts)
            for name, chunk in zip("qkv", value.chunk(3)):
                out[f"{block}self_attn.{name}_proj.{m.group(2)}"] = chunk.contiguous()
        elif key in proj:
            out[proj[key]] = value.t().contiguous()
        else:
            new = _rename(key, prefixes, parts)
            if new is None:
                raise _unmapped("OpenCLIP", [key])
            out[new] = value
    return out


# ---- configs -----------------------------------------------------------------------------------------------
def _mlp_ratio(hidden: int, width: int) -> float:
    """A float ratio whose int(width * ratio) is exactly `hidden` (the blocks' int(width * mlp_ratio))."""
    ratio = hidden / width
    if int(width * ratio) != hidden:
        ratio = (hidden + 0.5) / width
    return ratio


def _act(name: str, where: str) -> str:
    if name not in HF_ACTS:
        raise ConfigError(f"{where}: hidden_act {name!r} is not supported; {SUPPORTED}")
    return HF_ACTS[name]


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> ModelConfig:
    """An HF CLIPConfig dict (config.json) + its preprocessor_config.json -> mmfusion ModelConfig."""
    if hf.get("model_type") != "clip":
        raise ConfigError(f"model_type is {hf.get('model_type')!r}, not 'clip'; {SUPPORTED}")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    for name, sub in (("text_config", t), ("vision_config", v)):
        eps = sub.get("layer_norm_eps", 1e-5)
        if abs(eps - 1e-5) > 1e-12:
            raise ConfigError(f"{name}.layer_norm_eps is {eps}; {SUPPORTED}")
    if v.get("num_channels", 3) != 3:
        raise ConfigError(f"vision_config.num_channels is {v.get('num_channels')}; only RGB (3) is supported")
    pre = preprocessor or {}
    t_width, v_width = t.get("hidden_size", 512), v.get("hidden_size", 768)
    return ModelConfig(
        embed_dim=hf.get("projection_dim", 512),
        text=TextConfig(
            arch="clip",
            vocab_size=t.get("vocab_size", 49408),
            context_length=t.get("max_position_embeddings", 77),
            width=t_width,
            depth=t.get("num_hidden_layers", 12),
            heads=t.get("num_attention_heads", 8),
            mlp_ratio=_mlp_ratio(t.get("intermediate_size", 2048), t_width),
            act=_act(t.get("hidden_act", "quick_gelu"), "text_config"),
        ),
        image=ImageConfig(
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 32),
            width=v_width,
            depth=v.get("num_hidden_layers", 12),
            heads=v.get("num_attention_heads", 12),
            mlp_ratio=_mlp_ratio(v.get("intermediate_size", 3072), v_width),
            act=_act(v.get("hidden_act", "quick_gelu"), "vision_config"),
            mean=tuple(pre.get("image_mean", OPENAI_MEAN)),
            std=tuple(pre.get("image_std", OPENAI_STD)),
        ),
    )


def require_clip_arch(config: ModelConfig, target: str) -> None:
    """ConfigError unless `config` can be written as a CLIP checkpoint (`target`: 'HF CLIP' / 'OpenCLIP')."""
    if config.text.arch != "clip":
        raise ConfigError(
            f"export to {target} needs a model with text.arch clip (imported with `mmfusion import-clip`, or "
            "trained with model.text.arch: clip and a CLIP tokenizer): mmfusion's own text tower has a "
            "tokenizer and pooling that CLIP cannot reproduce"
        )
    if config.image.stem != "patch":
        raise ConfigError(f"export to {target} needs image.stem patch (CLIP's patch conv), not conv")


def config_to_hf(config: ModelConfig, bos_id: int, eot_id: int, pad_id: int) -> dict[str, Any]:
    """mmfusion ModelConfig (text.arch clip) -> the keyword arguments of transformers.CLIPConfig."""
    require_clip_arch(config, "HF CLIP")
    t, i = config.text, config.image
    return {
        "projection_dim": config.embed_dim,
        "text_config": {
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.context_length,
            "hidden_size": t.width,
            "num_hidden_layers": t.depth,
            "num_attention_heads": t.heads,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "hidden_act": ACT_TO_HF[t.act],
            "projection_dim": config.embed_dim,
            "bos_token_id": bos_id,
            "eos_token_id": eot_id,
            "pad_token_id": pad_id,
        },
        "vision_config": {
            "image_size": i.image_size,
            "patch_size": i.patch_size,
            "hidden_size": i.width,
            "num_hidden_layers": i.depth,
            "num_attention_heads": i.heads,
            "intermediate_size": int(i.width * i.mlp_ratio),
            "hidden_act": ACT_TO_HF[i.act],
            "projection_dim": config.embed_dim,
        },
    }


def image_normalisation(config: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's image mean / std as CLIP states them (0.5 / 0.5 for mmfusion's own [-1, 1] pixels)."""
    i = config.image
    if i.mean is None or i.std is None:
        return MMFUSION_MEAN, MMFUSION_STD
    return tuple(i.mean), tuple(i.std)


# ---- OpenCLIP model configs (open_clip_config.json: {"model_cfg": ..., "preprocess_cfg": ...}) ----------------
# model-config flags that change the network (OpenCLIP's CLIPVisionCfg / CLIPTextCfg): set, they are refused
_OC_COMMON_UNSUPPORTED = (
    "ls_init_value",
    "final_ln_after_pool",
    "act_kwargs",
    "norm_kwargs",
    "block_type",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)
_OC_VISION_UNSUPPORTED = ("timm_model_name", "attentional_pool", "no_ln_pre", *_OC_COMMON_UNSUPPORTED)
_OC_TEXT_UNSUPPORTED = ("hf_model_name", "embed_cls", "no_causal_mask", "proj_bias", *_OC_COMMON_UNSUPPORTED)


def _count_blocks(state: StateDict, prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})


def config_from_openclip(state: StateDict, oc: dict[str, Any] | None) -> tuple[ModelConfig, list[str]]:
    """An OpenCLIP CLIP state dict (already in mmfusion keys) + its optional model config -> (ModelConfig,
    the assumptions made when no config was given). Sizes come from the weights; heads and the activation
    from the config, whose absent keys take OpenCLIP's defaults (vision head_width 64, text heads 8, quick_gelu
    false). Without a config: quick_gelu false and a head width of 64 in both towers, reported as assumed."""
    oc = dict(oc or {})
    pre = oc.get("preprocess_cfg") or {}
    cfg = oc.get("model_cfg", oc)
    vc, tc = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    bad = [f"vision_cfg.{k}" for k in _OC_VISION_UNSUPPORTED if vc.get(k)]
    bad += [f"text_cfg.{k}" for k in _OC_TEXT_UNSUPPORTED if tc.get(k)]
    if isinstance(vc.get("layers"), (list, tuple)):
        bad.append("vision_cfg.layers (a ResNet)")
    if vc.get("pos_embed_type", "learnable") != "learnable":
        bad.append(f"vision_cfg.pos_embed_type={vc['pos_embed_type']}")
    if vc.get("pool_type", "tok") != "tok":
        bad.append(f"vision_cfg.pool_type={vc['pool_type']}")
    if tc.get("pool_type", "argmax") not in ("argmax", "eos"):
        bad.append(f"text_cfg.pool_type={tc['pool_type']}")
    if bad:
        raise ConfigError(f"unsupported OpenCLIP architecture ({', '.join(bad)}); {SUPPORTED}")
    assumed = [] if cfg else ["quick_gelu false (OpenAI's weights need true)", "head width 64 in both towers"]
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    try:
        conv, pos = state["image_encoder.patch_embed.weight"], state["image_encoder.positional_embedding"]
        tok, ln = state["text_encoder.token_embedding.weight"], state["text_encoder.ln_final.weight"]
        proj = state["text_encoder.proj.weight"]
        v_width, t_width = conv.shape[0], ln.shape[0]
        v_hidden = state["image_encoder.transformer.blocks.0.mlp.fc1.weight"].shape[0]
        t_hidden = state["text_encoder.transformer.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ConfigError(
            f"the OpenCLIP state dict has no {e.args[0]} (mmfusion name); {SUPPORTED}"
        ) from None
    grid = round((pos.shape[0] - 1) ** 0.5)
    config = ModelConfig(
        embed_dim=proj.shape[0],
        text=TextConfig(
            arch="clip",
            vocab_size=tok.shape[0],
            context_length=state["text_encoder.positional_embedding"].shape[0],
            width=t_width,
            depth=_count_blocks(state, "text_encoder.transformer.blocks."),
            heads=tc.get("heads", 8 if cfg else t_width // 64),
            mlp_ratio=_mlp_ratio(t_hidden, t_width),
            act=act,
        ),
        image=ImageConfig(
            image_size=conv.shape[-1] * grid,
            patch_size=conv.shape[-1],
            width=v_width,
            depth=_count_blocks(state, "image_encoder.transformer.blocks."),
            heads=v_width // vc.get("head_width", 64),
            mlp_ratio=_mlp_ratio(v_hidden, v_width),
            act=act,
            mean=tuple(pre.get("mean", OPENAI_MEAN)),
            std=tuple(pre.get("std", OPENAI_STD)),
        ),
    )
    return config, assumed


def config_to_openclip(config: ModelConfig, eot_id: int, vocab_max_id: int) -> dict[str, Any]:
    """mmfusion ModelConfig (text.arch clip) -> open_clip_config.json ({"model_cfg", "preprocess_cfg"})."""
    require_clip_arch(config, "OpenCLIP")
    t, i = config.text, config.image
    if t.act != i.act or t.act == "gelu_tanh":
        raise ConfigError(
            f"OpenCLIP has one activation for both towers, gelu or quick_gelu; this model has text {t.act}, "
            f"image {i.act}"
        )
    text_cfg: dict[str, Any] = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.depth,
        "mlp_ratio": t.mlp_ratio,
    }
    if eot_id != vocab_max_id:  # OpenCLIP's default pooling (argmax) finds <|endoftext|> only as the top id
        text_cfg.update(pool_type="eos", eos_id=eot_id)
    mean, std = image_normalisation(config)
    return {
        "model_cfg": {
            "embed_dim": config.embed_dim,
            "quick_gelu": t.act == "quick_gelu",
            "vision_cfg": {
                "image_size": i.image_size,
                "patch_size": i.patch_size,
                "width": i.width,
                "layers": i.depth,
                "head_width": i.width // i.heads,
                "mlp_ratio": i.mlp_ratio,
            },
            "text_cfg": text_cfg,
        },
        "preprocess_cfg": {"mean": list(mean), "std": list(std)},
    }


__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "SUPPORTED",
    "config_from_hf",
    "config_from_openclip",
    "config_to_hf",
    "config_to_openclip",
    "hf_to_openclip",
    "image_normalisation",
    "mmfusion_to_openclip",
    "openclip_to_hf",
    "openclip_to_mmfusion",
    "require_clip_arch",
]
