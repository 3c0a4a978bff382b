"""A LLaMA-shaped `UnifiedDecoder` as a Hugging Face `LlamaForCausalLM`: the config and the weights.

A UnifiedDecoder is a LLaMA (Touvron et al. 2023: pre-norm RMSNorm, rotate-half RoPE, SwiGLU, no biases)
when `mlp="swiglu"`, `qk_norm=False` and no multimodal option is on (no image window, modality-aware weights,
top-k, hierarchical layers or modality gate). Both models then compute the same logits for the same ids
(tests/unified/test_hf_parity.py); benchmarks/decoder_vs_hf.py uses this to time the two on equal work.

Weight names (ours -> HF, layer i):
    embed.weight                       -> model.embed_tokens.weight
    blocks.i.norm_1.weight             -> model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.linears.0.weight -> q_proj / k_proj / v_proj (rows [0, d), [d, 2d), [2d, 3d))
    blocks.i.attn.out.linears.0.weight -> model.layers.i.self_attn.o_proj.weight
    blocks.i.norm_2.weight             -> model.layers.i.post_attention_layernorm.weight
    blocks.i.mlp.fc1.linears.0.weight  -> gate_proj / up_proj (rows [0, h), [h, 2h))
    blocks.i.mlp.fc2.linears.0.weight  -> model.layers.i.mlp.down_proj.weight
    norm.weight                        -> model.norm.weight
    head.weight (untied)               -> lm_head.weight (tied: HF ties lm_head to embed_tokens)

RMSNorm epsilon: ours is torch's default (the dtype's machine epsilon), written into `rms_norm_eps`.
transformers is imported only by `to_llama` (an optional dependency).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .model import UnifiedConfig, UnifiedDecoder


def check_llama_shaped(cfg: UnifiedConfig) -> None:
    """Raise ConfigError naming the UnifiedConfig fields that make `cfg` differ from a LLaMA."""
    wrong = {
        "mlp": (cfg.mlp, "swiglu"),
        "qk_norm": (cfg.qk_norm, False),
        "image_window": (cfg.image_window, None),
        "modality_aware": (cfg.modality_aware, False),
        "sparse_topk": (cfg.sparse_topk, None),
        "hierarchical_layers": (cfg.hierarchical_layers, 0),
        "modality_gate": (cfg.modality_gate, False),
    }
    bad = [f"{k} = {v!r} (needs {want!r})" for k, (v, want) in wrong.items() if v != want]
    if bad:
        raise ConfigError("the decoder is not LLaMA-shaped: " + "; ".join(bad))


def llama_config_kwargs(cfg: UnifiedConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """`transformers.LlamaConfig` keyword arguments of the same architecture as `cfg`."""
    check_llama_shaped(cfg)
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": int(cfg.dim * cfg.mlp_ratio),
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": torch.finfo(dtype).eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropout,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
    }


def llama_state_dict(model: UnifiedDecoder) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names (see the module docstring); detached clones."""
    cfg = model.cfg
    check_llama_shaped(cfg)
    d, h = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    for i, block in enumerate(model.blocks):
        pre = f"model.layers.{i}."
        qkv = block.attn.qkv.linears[0].weight
        fc1 = block.mlp.fc1.linears[0].weight
        out |= {
            pre + "input_layernorm.weight": block.norm_1.weight,
            pre + "self_attn.q_proj.weight": qkv[:d],
            pre + "self_attn.k_proj.weight": qkv[d : 2 * d],
            pre + "self_attn.v_proj.weight": qkv[2 * d :],
            pre + "self_attn.o_proj.weight": block.attn.out.linears[0].weight,
            pre + "post_attention_layernorm.weight": block.norm_2.weight,
            pre + "mlp.gate_proj.weight": fc1[:h],
            pre + "mlp.up_proj.weight": fc1[h:],
            pre + "mlp.down_proj.weight": block.mlp.fc2.linears[0].weight,
        }
    if model.head is not None:
        out["lm_head.weight"] = model.head.weight
    return {k: v.detach().clone() for k, v in out.items()}


def to_llama(model: UnifiedDecoder, attn_implementation: str = "sdpa") -> Any:
    """A `transformers.LlamaForCausalLM` with `model`'s architecture and weights (eval mode, same device and
    dtype). Raises ConfigError when the decoder is not LLaMA-shaped, ImportError without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        raise ImportError(f"to_llama needs transformers (pip install transformers): {e}") from None
    weight = model.embed.weight
    hf_cfg = LlamaConfig(**llama_config_kwargs(model.cfg, weight.dtype))
    hf_cfg._attn_implementation = attn_implementation
    hf = LlamaForCausalLM(hf_cfg).to(device=weight.device, dtype=weight.dtype)
    missing, unexpected = hf.load_state_dict(llama_state_dict(model), strict=False)
    # a tied lm_head is not in our state dict; HF re-ties it to embed_tokens
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"weight mapping to LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


__all__ = ["check_llama_shaped", "llama_config_kwargs", "llama_state_dict", "to_llama"]
