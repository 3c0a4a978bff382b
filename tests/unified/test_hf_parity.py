"""A LLaMA-shaped UnifiedDecoder and the transformers LlamaForCausalLM built from it (mmfusion.unified.hf_llama)
compute the same logits and greedy continuations."""

import pytest
import torch

from mmfusion.errors import ConfigError
from mmfusion.unified.generation import generate
from mmfusion.unified.hf_llama import check_llama_shaped, llama_state_dict, to_llama
from mmfusion.unified.model import TEXT, UnifiedConfig, UnifiedDecoder

pytest.importorskip("transformers")

V = 97


def llama_shaped(**kw) -> UnifiedDecoder:
    torch.manual_seed(0)
    cfg = {"vocab_size": V, "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 2.5, "max_len": 64}
    cfg |= {"qk_norm": False, "mlp": "swiglu", "rope_base": 500.0}
    return UnifiedDecoder(UnifiedConfig(**(cfg | kw))).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_llama_logits_equal(tie):
    ours = llama_shaped(tie_embeddings=tie)
    hf = to_llama(ours)
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids, torch.full_like(ids, TEXT)).logits
        b = hf(ids).logits
    assert a.abs().max() > 0.1  # not a degenerate all-zero model
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the mapping is not the identity of HF's own random init: a fresh LlamaForCausalLM disagrees
    fresh = type(hf)(hf.config).eval()
    with torch.no_grad():
        assert (fresh(ids).logits - a).abs().max() > 1e-2


def test_llama_greedy_generation_equal():
    ours = llama_shaped()
    hf = to_llama(ours)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    mine = generate(ours, prompt, torch.full_like(prompt, TEXT), 12)  # KV cache
    with torch.no_grad():
        theirs = hf.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(mine, theirs[:, 5:])


def test_state_dict_names_and_shapes():
    sd = llama_state_dict(llama_shaped(depth=1))
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (80, 32)
    assert sd["model.layers.0.mlp.down_proj.weight"].shape == (32, 80)
    assert "lm_head.weight" not in sd  # tied


def test_not_llama_shaped_names_fields():
    with pytest.raises(ConfigError, match=r"mlp = 'gelu' \(needs 'swiglu'\); qk_norm = True"):
        check_llama_shaped(UnifiedConfig(vocab_size=V))
    with pytest.raises(ConfigError, match="image_window = 4"):
        to_llama(llama_shaped(image_window=4))


def test_mlp_option_validated():
    with pytest.raises(ConfigError, match="UnifiedConfig.mlp = 'relu': expected 'gelu' or 'swiglu'"):
        UnifiedConfig(vocab_size=V, mlp="relu")
