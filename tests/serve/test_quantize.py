import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.errors import CheckpointError, ConfigError
from mmfusion.serve.export import OnnxEncoders, example_inputs, export_onnx
from mmfusion.serve.quantize import prune_model, quantize_onnx, quantize_torchao_int8, weight_sparsity

MIN_COSINE = 0.98  # int8 vs fp32 embeddings of the same inputs, per row (measured >= 0.99 on this model)


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
        assert int8[name].stat().st_size < fp32[name].stat().st_size
        for batch, length in ((1, 16), (5, 3)):
            x = example_inputs(model, batch, length, seed=7)[name]
            cos = F.cosine_similarity(a.run(name, x), b.run(name, x), dim=1)
            assert cos.min() >= MIN_COSINE, (name, cos)


def test_quantize_onnx_needs_the_exported_files(tmp_path):
    with pytest.raises(CheckpointError, match="run export_onnx first"):
        quantize_onnx({"text": tmp_path / "text_encoder.onnx"})


def test_torchao_int8_weight_only_keeps_embeddings_close(model, make_tiny_model):
    ids = model.tokenizer.encode(["a small red circle", "a large blue square"])
    ref = model.embed_text_ids(ids).detach()
    q = quantize_torchao_int8(make_tiny_model())
    with torch.no_grad():
        cos = F.cosine_similarity(q.embed_text_ids(ids), ref, dim=1)
    assert cos.min() >= MIN_COSINE


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
