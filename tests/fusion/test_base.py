import pytest
import torch

from mmfusion.fusion.base import concat_tokens, masked_mean, masked_softmax, pool_modalities
from mmfusion.fusion.late import LateFusion


def test_modalities_are_sorted_and_inputs_validated(make_inputs):
    feats, masks = make_inputs()
    fusion = LateFusion(["text", "image", "audio"], 8)
    assert fusion.modalities == ["audio", "image", "text"]
    with pytest.raises(ValueError, match=r"expects modalities \['audio', 'image', 'text'\]"):
        fusion({k: v for k, v in feats.items() if k != "audio"}, masks)
    with pytest.raises(ValueError, match=r"features\['text'\] must have shape"):
        fusion({**feats, "text": feats["text"][..., :4]}, masks)
    with pytest.raises(ValueError, match=r"masks\['text'\] must be a bool tensor"):
        fusion(feats, {**masks, "text": masks["text"].float()})


def test_masked_softmax_renormalises_over_present_only():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    present = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    w = masked_softmax(logits, present)
    torch.testing.assert_close(w[0], logits[0].softmax(0), rtol=0, atol=1e-7)
    assert w[1, 1].item() == 0.0
    torch.testing.assert_close(w[1, [0, 2]], logits[1, [0, 2]].softmax(0), rtol=0, atol=1e-7)
    assert torch.equal(w[2], torch.zeros(3))


def test_token_helpers():
    feats = {"a": torch.ones(2, 2, 3), "b": 2 * torch.ones(2, 1, 3)}
    present = torch.tensor([[True, True], [True, False]])
    feats["b"][1] = 0  # absent rows arrive zero-filled
    tokens, valid = concat_tokens(feats, present, ["a", "b"])
    assert tokens.shape == (2, 3, 3)
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    assert masked_mean(tokens, valid)[:, 0].tolist() == pytest.approx([4 / 3, 1.0])
    assert pool_modalities(feats, ["a", "b"])[:, :, 0].tolist() == [[1.0, 2.0], [1.0, 0.0]]
