import torch

from mmfusion.fusion.late import LateFusion


def _fusion():
    torch.manual_seed(0)
    return LateFusion(["text", "image", "audio"], 8)


def test_shapes_and_weights(make_inputs):
    feats, masks = make_inputs()
    out = _fusion()(feats, masks)
    assert out.pooled.shape == (4, 8)
    assert out.tokens is None
    w = out.info["weights"]
    assert w.shape == (4, 3)
    # sorted order: audio, image, text; sample 1 lacks text, sample 2 has only text
    assert w[1, 2].item() == 0.0
    assert w[2].tolist() == [0.0, 0.0, 1.0]
    torch.testing.assert_close(w.sum(dim=1), torch.ones(4), rtol=0, atol=1e-6)


def test_masked_modality_cannot_change_output(make_inputs, assert_mask_invariant):
    feats, masks = make_inputs()
    assert_mask_invariant(_fusion(), feats, masks)


def test_all_absent_gives_learned_null_vector(make_inputs):
    feats, masks = make_inputs(present={m: [False, True] for m in ("text", "image", "audio")})
    fusion = _fusion()
    with torch.no_grad():
        fusion.null.fill_(0.5)
    out = fusion(feats, masks)
    assert torch.equal(out.pooled[0], torch.full((8,), 0.5))
    assert torch.equal(out.info["weights"][0], torch.zeros(3))
    out.pooled.sum().backward()
    assert fusion.null.grad is not None and torch.isfinite(fusion.key.weight.grad).all()
