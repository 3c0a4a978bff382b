import torch

from mmfusion.fusion.router import RouterFusion


def _fusion(**kw):
    torch.manual_seed(0)
    return RouterFusion(["text", "image", "audio"], 8, **kw)


def test_shapes(make_inputs):
    feats, masks = make_inputs()
    out = _fusion()(feats, masks)
    assert out.pooled.shape == (4, 8)
    assert out.tokens is None
    assert out.info["gates"].shape == (4, 3)
    assert out.aux_loss.item() == 0.0


def test_absent_weight_is_exactly_zero_and_rest_renormalise(make_inputs):
    feats, masks = make_inputs()
    fusion = _fusion()
    captured = {}
    fusion.router.register_forward_hook(lambda mod, inp, out: captured.setdefault("logits", out))
    gates = fusion(feats, masks).info["gates"]
    logits = captured["logits"]
    present = torch.stack([masks[m] for m in fusion.modalities], dim=1)
    assert torch.equal(gates[~present], torch.zeros(int((~present).sum())))
    for b in range(4):
        torch.testing.assert_close(gates[b, present[b]], logits[b, present[b]].softmax(0), rtol=0, atol=1e-7)
    assert gates[2].tolist() == [0.0, 0.0, 1.0]  # only text present: its weight is exactly 1


def test_masked_modality_cannot_change_output(make_inputs, assert_mask_invariant):
    feats, masks = make_inputs()
    assert_mask_invariant(_fusion(prune_threshold=0.3).eval(), feats, masks)


def test_prune_report_only_in_eval(make_inputs):
    feats, masks = make_inputs()
    fusion = _fusion(prune_threshold=0.3)
    assert "prune" not in fusion(feats, masks).info
    out = fusion.eval()(feats, masks)
    gates, present = out.info["gates"], torch.stack([masks[m] for m in fusion.modalities], dim=1)
    assert torch.equal(out.info["prune"], present & (gates < 0.3))
    fusion.prune_threshold = 1.01  # every present modality is below it; absent ones are never reported
    assert torch.equal(fusion(feats, masks).info["prune"], present)


def test_all_absent_gives_learned_null_vector(make_inputs):
    feats, masks = make_inputs(present={m: [False, True] for m in ("text", "image", "audio")})
    fusion = _fusion()
    with torch.no_grad():
        fusion.null.fill_(-1.0)
    out = fusion(feats, masks)
    assert torch.equal(out.pooled[0], torch.full((8,), -1.0))
    assert torch.equal(out.info["gates"][0], torch.zeros(3))
    assert torch.isfinite(out.pooled).all()
