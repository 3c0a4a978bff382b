"""The joint denoiser, its per-modality timesteps, the training loss, EMA and the consistency losses."""

from __future__ import annotations

import pytest
import torch

from diffusion_tiny import tiny_config, transformer_inputs
from mmfusion.batch import Batch
from mmfusion.diffusion.model import JointDiffusion, draw_timesteps, reverse_gradient


def _batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    data = {
        "image": torch.rand(b, 3, s, s, generator=g) * 2 - 1,
        "text": torch.randn(b, cfg.text_len, cfg.text_dim, generator=g),
    }
    ones = torch.ones(b, dtype=torch.bool)
    return Batch(data, {"image": ones, "text": ones})


def test_denoiser_shapes_and_per_modality_timesteps(tiny_model):
    cfg, net = tiny_model.cfg, tiny_model.net
    t = torch.tensor([-1, 0, 49])
    ei, et = net.time_image(t), net.time_text(t)
    assert ei.shape == et.shape == (3, cfg.width)
    assert not torch.allclose(ei, et)  # one embedding per modality
    xi, xt = torch.randn(3, cfg.image_tokens, 48), torch.randn(3, cfg.text_len, cfg.text_dim)
    out = net(xi, xt, t, t)
    assert out.eps_image.shape == (3, 4, 48) and out.eps_text.shape == (3, 8, 8)
    assert out.hidden.shape == (3, 4 + 8, cfg.width)
    # each modality reads its own timestep: changing the text's changes the text and image predictions
    other = net(xi, xt, t, torch.tensor([5, 5, 5]))
    assert torch.equal(out.eps_image, net(xi, xt, t, t).eps_image)
    assert not torch.allclose(other.eps_text, out.eps_text)


def test_output_heads_start_at_zero():
    torch.manual_seed(0)
    m = JointDiffusion(tiny_config())
    cfg = m.cfg
    out = m.net(torch.randn(2, 4, 48), torch.randn(2, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2]))
    assert out.eps_image.abs().max() == 0 and out.x0_text.abs().max() == 0
    # the eps of the text follows from its x0 estimate: (x - sqrt(ab) x0) / sqrt(1 - ab) = x / sqrt(1 - ab)
    a = m.schedule.alpha_bar[torch.tensor([1, 2])].float().reshape(2, 1, 1)
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(0))
    got = m.net(torch.zeros(2, 4, 48), x, torch.tensor([3, 4]), torch.tensor([1, 2])).eps_text
    torch.testing.assert_close(got, x / (1 - a).sqrt())
    # the loss of zero predictions: the noise's mean square (image) + the latent's (text), about 1 each
    torch.manual_seed(1)
    loss = m(_batch(cfg, b=64)).loss.item()
    assert 1.8 < loss < 2.2


def test_draw_timesteps_modes():
    cfg = tiny_config(cond_prob=1.0, uncond_prob=0.0)
    ti, tt = draw_timesteps(cfg, 200, torch.Generator().manual_seed(0))
    assert ((ti == -1) ^ (tt == -1)).all()  # exactly one clean condition per sample
    assert 60 < int((ti == -1).sum()) < 140
    cfg = tiny_config(cond_prob=0.0, uncond_prob=1.0)
    ti, tt = draw_timesteps(cfg, 200, torch.Generator().manual_seed(0))
    assert ((ti == 49) | (tt == 49)).all() and (ti >= 0).all() and (tt >= 0).all()
    cfg = tiny_config(cond_prob=0.0, uncond_prob=0.0)
    ti, tt = draw_timesteps(cfg, 500, torch.Generator().manual_seed(0))
    assert ti.min() >= 0 and ti.max() <= 49 and not torch.equal(ti, tt)


def test_clean_modality_carries_no_loss():
    torch.manual_seed(0)
    m = JointDiffusion(tiny_config(cond_prob=1.0, uncond_prob=0.0))
    torch.manual_seed(3)
    out = m(_batch(m.cfg, b=1))
    # one sample, one of its modalities clean: exactly one of the two per-modality losses is 0
    assert (out.metrics["mse_image"] == 0) != (out.metrics["mse_text"] == 0)


def test_ema_update_by_hand():
    torch.manual_seed(0)
    m = JointDiffusion(tiny_config(ema_decay=0.5))
    p_net, p_ema = m.net.image_in.weight, m.ema_net.image_in.weight
    with torch.no_grad():
        p_ema.fill_(0.0)
        p_net.fill_(1.0)
    assert m.update_ema() == pytest.approx(0.1)  # min(0.5, (1 + 0) / (10 + 0))
    torch.testing.assert_close(p_ema, torch.full_like(p_ema, 0.9))
    with torch.no_grad():
        p_net.fill_(2.0)
    d = m.update_ema()  # min(0.5, 2 / 11)
    assert d == pytest.approx(2 / 11)
    torch.testing.assert_close(p_ema, torch.full_like(p_ema, 0.9 * d + 2.0 * (1 - d)))
    for _ in range(20):
        d = m.update_ema()
    assert d == 0.5 and int(m.ema_updates) == 22
    assert not any(p.requires_grad for p in m.ema_net.parameters())


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    (reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [-0.5, -1.0, -1.5]


def test_consistency_losses_join_the_loss_and_train_their_parts():
    torch.manual_seed(0)
    m = JointDiffusion(tiny_config(align_weight=0.5, adv_weight=0.1, cond_prob=0.0, uncond_prob=0.0))
    torch.manual_seed(0)
    plain = JointDiffusion(tiny_config(cond_prob=0.0, uncond_prob=0.0))
    assert not hasattr(plain, "discriminator") and not hasattr(plain, "align_image")
    torch.manual_seed(5)
    out = m(_batch(m.cfg, b=16))
    assert "align" in out.metrics and "disc" in out.metrics
    out.loss.backward()
    assert m.discriminator.mlp[0].weight.grad.abs().sum() > 0
    assert m.align_image.weight.grad.abs().sum() > 0


def test_x0_image_head_derives_eps_and_trains_on_x0():
    torch.manual_seed(0)
    m = JointDiffusion(tiny_config(image_target="x0", cond_prob=0.0, uncond_prob=0.0))
    x = torch.randn(2, 4, 48, generator=torch.Generator().manual_seed(0))
    out = m.net(x, torch.randn(2, 8, 8), torch.tensor([3, -1]), torch.tensor([1, 2]))
    a = m.schedule.alpha_bar[3].float()
    assert out.x0_image.abs().max() == 0  # zero-initialised head: x0 = 0, so eps = x / sqrt(1 - ab)
    torch.testing.assert_close(out.eps_image[0], x[0] / (1 - a).sqrt())
    assert out.eps_image[1].abs().max() == 0  # a clean row has no noise
    torch.manual_seed(1)
    b = _batch(m.cfg, b=64)
    torch.manual_seed(2)
    got = m(b).metrics["mse_image"].item()
    assert got == pytest.approx(b["image"].pow(2).mean().item(), rel=0.05)  # x0 loss of a zero estimate


def test_text_summary_starts_as_a_no_op_and_carries_the_text_to_every_image_token():
    torch.manual_seed(0)
    with_summary = JointDiffusion(tiny_config(text_summary=True)).net
    torch.manual_seed(0)
    plain = JointDiffusion(tiny_config()).net
    plain.image_out.weight.data.normal_()  # non-zero heads, so the image output shows its inputs
    with_summary.load_state_dict(plain.state_dict(), strict=False)
    g = torch.Generator().manual_seed(1)
    xi, xt = torch.randn(2, 4, 48, generator=g), torch.randn(2, 8, 8, generator=g)
    t = torch.tensor([10, 20])
    # zero-initialised output layer: the same image prediction as the model without the summary
    torch.testing.assert_close(with_summary(xi, xt, t, t).eps_image, plain(xi, xt, t, t).eps_image)
    assert "text_summary.0.weight" not in plain.state_dict()
    # once trained (non-zero), every image token's transformer input gains MLP([flat text, text time])
    with_summary.text_summary[2].weight.data.normal_()
    seen = transformer_inputs({"summary": with_summary, "plain": plain}, xi, xt, t, t)
    extra = with_summary.text_summary(torch.cat([xt.flatten(1), with_summary.time_text(t)], dim=1))
    torch.testing.assert_close(seen["summary"][:, :4] - seen["plain"][:, :4], extra[:, None].expand(2, 4, 16))
    torch.testing.assert_close(seen["summary"][:, 4:], seen["plain"][:, 4:])  # text tokens unchanged


def test_snr_weight_truncates_and_caps_the_signal_to_noise_ratio():
    from mmfusion.diffusion.model import snr_weight
    from mmfusion.diffusion.schedule import NoiseSchedule

    s = NoiseSchedule(50, "cosine")
    ab = s.alpha_bar
    snr16 = float(ab[16] / (1 - ab[16]))  # 2.756: between 1 and the cap
    assert 1 < snr16 < 5
    got = snr_weight(s, torch.tensor([-1, 0, 16, 40]), gamma=5.0)
    # clean row: no loss; t = 0 (SNR 571) capped at 5; t = 16 its SNR; t = 40 (SNR 0.083) raised to 1
    torch.testing.assert_close(got, torch.tensor([0.0, 5.0, snr16, 1.0]))


def test_snr_weighted_image_loss_is_the_weighted_mean_of_the_x0_errors():
    from mmfusion.diffusion.model import snr_weight

    torch.manual_seed(0)
    m = JointDiffusion(tiny_config(image_target="x0", image_snr_weight=3.0, cond_prob=0.0, uncond_prob=0.0))
    batch = _batch(m.cfg, b=6)
    torch.manual_seed(5)
    got = m(batch).metrics["mse_image"]
    # the same draws by hand: zero-initialised heads predict x0 = 0, so each row's error is mean(x0^2)
    torch.manual_seed(5)
    t_image, _ = draw_timesteps(m.cfg, 6)
    w = snr_weight(m.schedule, t_image, 3.0)
    err = (batch["image"] ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, (err * w).sum() / w.sum())
