import torch

from mmfusion.fusion.early import EarlyFusion


def _fusion():
    torch.manual_seed(0)
    return EarlyFusion(["text", "image", "audio"], 8, depth=2, heads=2).eval()


def test_shapes(make_inputs):
    feats, masks = make_inputs()
    out = _fusion()(feats, masks)
    assert out.pooled.shape == (4, 8)
    assert out.tokens.shape == (4, 9, 8)
    assert out.aux_loss.item() == 0.0
    # token order = sorted modalities: audio (2), image (3), text (4); sample 2 has only text
    assert out.info["token_mask"][2].tolist() == [False] * 5 + [True] * 4
    assert torch.equal(out.tokens[2, :5], torch.zeros(5, 8))


def test_masked_modality_cannot_change_output(make_inputs, assert_mask_invariant):
    feats, masks = make_inputs()
    assert_mask_invariant(_fusion(), feats, masks)


def test_present_modalities_do_change_output(make_inputs):
    feats, masks = make_inputs()
    fusion = _fusion()
    ref = fusion(feats, masks)
    out = fusion({**feats, "image": feats["image"].flip(-1)}, masks)
    assert not torch.allclose(out.pooled[0], ref.pooled[0])
    assert torch.equal(out.pooled[2], ref.pooled[2])  # image absent in sample 2


def test_all_absent_gives_learned_null_vector(make_inputs):
    absent = {m: [False, True] for m in ("text", "image", "audio")}
    feats, masks = make_inputs(present=absent)
    fusion = _fusion()
    out = fusion(feats, masks)
    assert torch.isfinite(out.pooled).all()
    other, _ = make_inputs(seed=5, present=absent)
    assert torch.equal(fusion(other, masks).pooled[0], out.pooled[0])  # independent of the placeholders
