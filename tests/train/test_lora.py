"""LoRA adapters (T4): identity at init, only adapters train, save/load, merge, clear errors."""

import pytest
import torch

from mmfusion.config import ModelConfig
from mmfusion.errors import ConfigError
from mmfusion.modalities.text import TextTokenizer
from mmfusion.models.contrastive import ContrastiveModel
from mmfusion.train.lora import (
    apply_lora,
    load_adapters,
    lora_summary,
    merge_lora,
    resolve_targets,
    save_adapters,
)

CAPTIONS = ["a small red circle", "a large blue square", "a small green triangle", "a large white cross"]
TARGET = ["attn.qkv", "mlp.fc1"]


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer.train(CAPTIONS * 4, vocab_size=60, context_length=8)


def tiny(tokenizer) -> ContrastiveModel:
    # widths 8, one block per tower, MLP hidden 32: qkv is Linear(8, 24), fc1 is Linear(8, 32)
    cfg = ModelConfig.model_validate(
        {
            "embed_dim": 8,
            "text": {"width": 8, "depth": 1, "heads": 2, "context_length": 8},
            "image": {"image_size": 8, "patch_size": 4, "width": 8, "depth": 1, "heads": 2},
        }
    )
    torch.manual_seed(0)
    return ContrastiveModel(cfg, tokenizer)


def batch(tokenizer):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, "text": tokenizer.encode(CAPTIONS)}


def outputs(model, b):
    with torch.no_grad():
        return model(b).loss, model.embed_image_tensor(b["image"]), model.embed_text_ids(b["text"])


def train_steps(model, b, steps=3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        model(b).loss.backward()
        opt.step()
    return model.eval()


def test_targets_suffix_and_regex(tokenizer):
    model = tiny(tokenizer)
    assert resolve_targets(model, ["attn.out"]) == [
        "text_encoder.transformer.blocks.0.attn.out",
        "image_encoder.transformer.blocks.0.attn.out",
    ]
    assert resolve_targets(model, [r"image_encoder\..*\.mlp\.fc\d"]) == [
        "image_encoder.transformer.blocks.0.mlp.fc1",
        "image_encoder.transformer.blocks.0.mlp.fc2",
    ]


def test_bad_pattern_names_itself(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(ConfigError, match="attn.qvk"):
        apply_lora(model, ["attn.qkv", "attn.qvk"])
    with pytest.raises(ConfigError, match="ln_1"):  # a LayerNorm, not a Linear
        apply_lora(model, ["ln_1"])
    assert not any("lora" in n for n, _ in model.named_modules())  # nothing was changed


def test_identity_at_init_and_exact_trainable_fraction(tokenizer, capsys):
    model = tiny(tokenizer).eval()
    b = batch(tokenizer)
    ref = outputs(model, b)
    base_total = sum(p.numel() for p in model.parameters())
    apply_lora(model, TARGET, r=2, alpha=4)
    # per tower: qkv A (2x8) + B (24x2) = 64, fc1 A (2x8) + B (32x2) = 80; two towers -> 288
    trainable, total, fraction = lora_summary(model)
    assert (trainable, total) == (288, base_total + 288)
    assert fraction == 288 / (base_total + 288)
    assert f"trainable 288 / {base_total + 288:,} parameters" in capsys.readouterr().out
    for a, c in zip(outputs(model, b), ref):
        assert torch.equal(a, c)  # B = 0: the adapted model computes exactly what the base model does


def test_training_saving_and_merging(tokenizer, tmp_path):
    b = batch(tokenizer)
    model = tiny(tokenizer)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, TARGET, r=2, alpha=4, verbose=False)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora_before) == 8 and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    train_steps(model, b)

    # only LoRA parameters moved; every base tensor (weights, biases, logit_scale, ...) is untouched
    for name, value in model.state_dict().items():
        if "lora_" in name:
            assert not torch.equal(value, lora_before[name]), name
        else:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    adapted = outputs(model, b)
    assert not torch.equal(adapted[0], outputs(tiny(tokenizer).eval(), b)[0])

    # adapters alone on disk, in safetensors; a fresh base model + adapters = the trained model
    save_adapters(model, tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    from safetensors.torch import load_file

    assert len(load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))) == 8
    again = load_adapters(tiny(tokenizer).eval(), tmp_path / "lora")
    for x, y in zip(outputs(again, b), adapted):
        assert torch.equal(x, y)

    # merged: a plain model with the base model's keys and the adapted model's outputs
    merged = merge_lora(model)
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_modules())
    assert not hasattr(merged, "peft_config")
    assert set(merged.state_dict()) == set(base)
    assert all(type(m) is torch.nn.Linear for n, m in merged.named_modules() if n.endswith(("qkv", "fc1")))
    for x, y in zip(outputs(merged, b), adapted):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
