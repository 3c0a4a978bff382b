"""train.grad_checkpointing, train.init_from and train.lora in runs of both recipes (mmfusion.train.model_setup)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mmfusion import load_model
from mmfusion.config import LoraConfig, TrainConfig, config_from_dict
from mmfusion.errors import ConfigError
from mmfusion.run import train
from mmfusion.train.model_setup import load_init_weights, prepare_model

RECIPES = ["task", "two_tower"]


def last_checkpoint(run):
    return load_file(str(sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"))


def losses(run):
    import json

    return [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES)
def test_grad_checkpointing_recomputes_every_block_and_changes_nothing(
    recipe, tiny_run, tmp_path, monkeypatch
):
    import mmfusion.layers as layers

    calls = []
    real = layers.checkpoint
    monkeypatch.setattr(layers, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    train(config_from_dict(tiny_run(tmp_path, "off", recipe)), log=lambda m: None)
    assert calls == []
    logged = []
    train(
        config_from_dict(tiny_run(tmp_path, "on", recipe, train={"grad_checkpointing": True})),
        log=logged.append,
    )
    assert "gradient checkpointing on 2 Transformer stack(s)" in logged  # the image and text encoders
    assert len(calls) == 4 * 2  # 4 steps x one block per stack: the flag reached the blocks
    assert losses(tmp_path / "on") == losses(tmp_path / "off")
    off, on = last_checkpoint(tmp_path / "off"), last_checkpoint(tmp_path / "on")
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)  # bitwise


def test_grad_checkpointing_without_a_transformer_is_a_config_error():
    with pytest.raises(ConfigError, match="train.grad_checkpointing: Linear has no layers.Transformer stack"):
        prepare_model(nn.Linear(2, 2), TrainConfig(grad_checkpointing=True), log=lambda m: None)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_run):
    """A trained task run, the starting point of the LoRA run."""
    out = tmp_path_factory.mktemp("lora")
    train(config_from_dict(tiny_run(out, "base")), log=lambda m: None)
    return out / "base"


def test_lora_on_a_fusion_model_trains_only_adapters_and_merges_into_the_saved_model(
    base_run, tiny_run, tmp_path
):
    lora = {"r": 2, "alpha": 4, "targets": ["attn.qkv", "mlp.fc1"], "trainable": ["head.*"]}
    cfg = config_from_dict(tiny_run(tmp_path, "lora", train={"init_from": str(base_run), "lora": lora}))
    train(cfg, log=lambda m: None)
    run = tmp_path / "lora"
    init = load_file(str(base_run / "model" / "model.safetensors"))
    adapted = last_checkpoint(run)
    lora_keys = [k for k in adapted if "lora_" in k]
    assert len(lora_keys) == 2 * 2 * 2  # (qkv, fc1) x (image, text) x (A, B)
    assert all(adapted[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0: it trained
    for key, value in adapted.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        if key.startswith("head."):
            assert not torch.equal(value, init[base_key]), key  # `trainable` keeps the head training
        else:
            assert torch.equal(value, init[base_key]), key  # frozen: bitwise the init_from weights
    assert (run / "tokenizer.json").read_text() == (base_run / "tokenizer.json").read_text()
    assert sorted(p.name for p in (run / "adapters").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # the saved model is plain (base keys only) and computes what the adapted model computes
    merged = load_model(run)
    assert set(merged.state_dict()) == set(init)
    from mmfusion.train.lora import apply_lora

    reference = load_model(base_run)
    apply_lora(reference, lora["targets"], r=2, alpha=4, verbose=False)
    reference.load_state_dict(adapted)
    from mmfusion.evaluate import task_batches

    batch = task_batches(cfg, merged, "test")[0]
    with torch.no_grad():
        torch.testing.assert_close(
            merged.logits(batch)[0], reference.eval().logits(batch)[0], atol=1e-5, rtol=0
        )


def test_lora_on_the_two_tower_model(tiny_run, tmp_path):
    cfg = config_from_dict(
        tiny_run(tmp_path, "tt", "two_tower", train={"lora": {"r": 2, "targets": ["attn.out"]}})
    )
    notes = []
    train(cfg, log=notes.append)
    assert "note: train.lora without train.init_from adapts a randomly initialised model" in notes
    adapted = last_checkpoint(tmp_path / "tt")
    first = load_file(str(sorted((tmp_path / "tt" / "checkpoints").glob("step-*"))[0] / "model.safetensors"))
    changed = sorted(k for k in adapted if not torch.equal(adapted[k], first[k]))
    assert changed and all("lora_" in k for k in changed)  # steps 2 -> 4: only adapter tensors moved
    merged = load_model(tmp_path / "tt")
    assert not any("lora" in k for k in merged.state_dict())
    from mmfusion.train.lora import apply_lora

    reference = merged.__class__(merged.config, merged.tokenizer)
    apply_lora(reference, ["attn.out"], r=2, alpha=16, verbose=False)
    reference.load_state_dict(adapted)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            merged.embed_image_tensor(images), reference.eval().embed_image_tensor(images), atol=1e-5, rtol=0
        )


def test_lora_and_init_from_errors_name_the_key(base_run, tmp_path):
    from mmfusion.models.multimodal import MultiModalModel

    model = load_model(base_run)
    bad_targets = TrainConfig(lora=LoraConfig(targets=["attn.qvk"]))
    with pytest.raises(ConfigError, match=r"train.lora.targets: LoRA target pattern\(s\) \['attn.qvk'\]"):
        prepare_model(model, bad_targets, log=lambda m: None)
    model = load_model(base_run)
    with pytest.raises(ConfigError, match="train.lora.trainable: pattern 'heads.*' matches no parameter"):
        prepare_model(model, TrainConfig(lora=LoraConfig(trainable=["heads.*"])), log=lambda m: None)
    wider = MultiModalModel.from_config({**model.config.model_dump(), "dim": 24}, model.tokenizer)
    with pytest.raises(
        ConfigError, match=r"train.init_from = .*: its weights do not fit the run's model \(.* has"
    ):
        load_init_weights(wider, str(base_run))
    with pytest.raises(ConfigError, match="train.init_from = 'nowhere': no model.safetensors there"):
        load_init_weights(model, "nowhere")
