import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.errors import CheckpointError, ConfigError
from mmfusion.serve.export import OnnxEncoders, example_inputs, export_onnx
from mmfusion.serve.quantize import (
    finetune_pruned,
    make_permanent,
    onnx_cosine,
    prune_model,
    quantize_onnx,
    quantize_torchao_int8,
    tensor_bytes,
    weight_sparsity,
)

# Thresholds near the values measured on this tiny model (width 16; onnxruntime 1.32, torchao 0.18).
# Lowest per-row cosine of int8 to fp32 embeddings of the same inputs: ONNX measured 0.99932 (text, onnx_cosine;
# image 0.99989); 7-bit weights (quantize_dynamic's reduce_range) give 0.99837 and fail. torchao measured 0.99996.
MIN_COSINE = 0.999
MIN_COSINE_TORCHAO = 0.9995
# int8 / fp32 ONNX file size: measured 0.604 (text) and 0.519 (image); below 1 only because the weights are
# int8 (the pre-processed fp32 graph alone is 0.89), above 0.25 because of the graph and the float biases and
# norms of so small a model
MAX_SIZE_RATIO = {"text": 0.65, "image": 0.56}
# torchao in-memory parameters + buffers, int8 / fp32: measured 0.608 (int8 Linear weights + scales)
MAX_TORCHAO_BYTES_RATIO = 0.65


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model()


def test_int8_onnx_is_smaller_and_close_to_fp32(model, tmp_path):
    fp32 = export_onnx(model, tmp_path)
    int8 = quantize_onnx(fp32)
    assert {p.name for p in int8.values()} == {"text_encoder.int8.onnx", "image_encoder.int8.onnx"}
    assert not list(tmp_path.glob("*.prep.onnx"))
    a, b = OnnxEncoders(model, fp32), OnnxEncoders(model, int8)
    for name in ("text", "image"):
        ratio = int8[name].stat().st_size / fp32[name].stat().st_size
        assert ratio <= MAX_SIZE_RATIO[name], (name, ratio)
        for batch, length in ((1, 16), (5, 3)):
            x = example_inputs(model, batch, length, seed=7)[name]
            cos = F.cosine_similarity(a.run(name, x), b.run(name, x), dim=1)
            assert cos.min() >= MIN_COSINE, (name, cos)
    cos = onnx_cosine(model, int8)
    assert set(cos) == {"text", "image"} and min(cos.values()) >= MIN_COSINE


def test_quantize_onnx_needs_the_exported_files(tmp_path):
    with pytest.raises(CheckpointError, match="run export_onnx first"):
        quantize_onnx({"text": tmp_path / "text_encoder.onnx"})


def test_torchao_int8_weight_only_keeps_embeddings_close(model, make_tiny_model, tmp_path):
    ids = model.tokenizer.encode(["a small red circle", "a large blue square"])
    ref = model.embed_text_ids(ids).detach()
    q = quantize_torchao_int8(make_tiny_model())
    with torch.no_grad():
        cos = F.cosine_similarity(q.embed_text_ids(ids), ref, dim=1)
    assert cos.min() >= MIN_COSINE_TORCHAO
    assert tensor_bytes(q) <= MAX_TORCHAO_BYTES_RATIO * tensor_bytes(model)  # int8 Linear weights (+ scales)
    with pytest.raises(RuntimeError):  # why `quantize --method torchao` saves only the ONNX files
        q.save_pretrained(tmp_path)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_prune_reaches_the_requested_sparsity_and_is_permanent(sparsity, make_tiny_model):
    m = make_tiny_model()
    linear = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    n = sum(mod.weight.numel() for mod in linear)
    pruned = {f"{name}.weight" for name, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    other = {k: v.clone() for k, v in m.state_dict().items() if k not in pruned}
    achieved = prune_model(m, sparsity)
    assert achieved == round(sparsity * n) / n == weight_sparsity(m)
    # no re-parametrisation left: plain parameters, same state-dict keys, no hooks
    assert all(not hasattr(mod, "weight_orig") and not hasattr(mod, "weight_mask") for mod in linear)
    assert all(isinstance(mod.weight, nn.Parameter) and not mod._forward_pre_hooks for mod in linear)
    assert set(m.state_dict()) == set(make_tiny_model().state_dict())
    # only Linear weights are touched: embeddings, norms, convs and biases keep their values
    for k, v in other.items():
        assert torch.equal(m.state_dict()[k], v), k


def test_prune_rejects_bad_arguments(make_tiny_model):
    with pytest.raises(ConfigError, match=r"expected a fraction in \[0, 1\]"):
        prune_model(make_tiny_model(), 1.5)
    with pytest.raises(ConfigError, match="no Conv3d module"):
        prune_model(make_tiny_model(), 0.5, modules=nn.Conv3d)


def test_finetune_after_pruning_keeps_the_sparsity_and_lowers_the_loss(make_tiny_model, tmp_path):
    from mmfusion.config import config_from_dict
    from mmfusion.run import load_split, model_collate, train_data

    cfg = config_from_dict(
        {
            "name": "ft",
            "out_dir": str(tmp_path),
            "seed": 0,
            "data": {"source": "synthetic", "synthetic": {"seed": 0, "n_train": 64, "n_val": 8, "n_test": 8}},
            "model": {"image": {"image_size": 16}},
            "train": {
                "steps": 100,
                "batch_size": 32,
                "lr": 3.0e-3,
                "warmup_steps": 0,
                "precision": "fp32",
                "device": "cpu",
                "threads": 1,
                "progress": False,
            },
        }
    )
    m = make_tiny_model()
    fixed = next(
        iter(train_data(cfg, load_split(cfg, "train"), model_collate(cfg, m), 32).step_batches(0, 0, 0, 1, 1))
    )[0]

    def loss() -> float:
        m.eval()
        with torch.no_grad():
            return float(m(fixed).loss)

    linear = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    n = sum(mod.weight.numel() for mod in linear)
    achieved = prune_model(m, 0.5, permanent=False)
    assert achieved == round(0.5 * n) / n
    masks = [mod.weight_mask.clone() for mod in linear]
    pruned_loss = loss()
    last = finetune_pruned(m, cfg, 6, tmp_path / "ft", log=lambda *a: None)
    assert last["step"] == 6
    make_permanent(m)
    assert all(not hasattr(mod, "weight_orig") and not hasattr(mod, "weight_mask") for mod in linear)
    # the same weights are zero as right after pruning, and only those
    assert weight_sparsity(m) == achieved
    for mod, mask in zip(linear, masks, strict=True):
        assert torch.equal(mod.weight != 0, mask.bool())
    assert loss() < pruned_loss


def test_finetune_needs_pruning_masks(make_tiny_model, tmp_path):
    from mmfusion.config import load_config

    m = make_tiny_model()
    prune_model(m, 0.5)  # permanent: nothing to keep during fine-tuning
    with pytest.raises(ConfigError, match="no pruning masks"):
        finetune_pruned(m, load_config(None), 2, tmp_path)
