"""The conv U-Net image branch (`image_net: unet`) and the image summary path of the joint denoiser."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from diffusion_tiny import randomised, tiny_config, transformer_inputs
from mmfusion.diffusion.model import JointDiffusion
from mmfusion.diffusion.recipe import load_diffusion, save_diffusion
from mmfusion.diffusion.sampling import sample
from mmfusion.diffusion.unet import FiLMBlock


def _unet(**kw):
    return tiny_config(image_net="unet", conv_channels=4, **kw)  # 8 px, patch 4: levels at 8 and 4 px


def _inputs(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 48, generator=g), torch.randn(b, 8, 8, generator=g)


def test_unet_shapes_levels_and_zero_output_at_init():
    torch.manual_seed(0)
    net = JointDiffusion(_unet(image_target="x0")).net
    assert net.encoder.chs == [4, 8] and net.image_in is None and net.image_out is None
    xi, xt = _inputs()
    t = torch.tensor([-1, 0, 49])
    out = net(xi, xt, t, t)
    assert out.eps_image.shape == (3, 4, 48) and out.hidden.shape == (3, 4 + 8, 16)
    assert out.x0_image.abs().max() == 0  # the zero-initialised output conv, like the linear head
    tokens, skips = net.encoder(torch.randn(3, 3, 8, 8), torch.randn(3, 16))
    assert tokens.shape == (3, 4, 16) and [s.shape[1:] for s in skips] == [(4, 8, 8), (8, 4, 4)]


def test_film_block_starts_as_the_identity():
    torch.manual_seed(0)
    block = FiLMBlock(4, 6)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x, torch.randn(2, 6)), x)


def test_unet_keeps_one_timestep_per_modality():
    torch.manual_seed(0)
    m = randomised(JointDiffusion(_unet()))
    net = m.net
    xi, xt = _inputs()
    t = torch.tensor([3, 10, 20])
    base = net(xi, xt, t, t)
    # the image's timestep reaches the conv levels and the tokens; the text's reaches the text tokens
    other_image = net(xi, xt, torch.tensor([30, 40, 45]), t)
    other_text = net(xi, xt, t, torch.tensor([30, 40, 45]))
    assert not torch.allclose(other_image.eps_image, base.eps_image)
    assert not torch.allclose(other_text.eps_text, base.eps_text)
    # a conv level sees the image timestep: FiLM of time_image changes when only t_image changes
    level = net.decoder.blocks[-1].film
    ci, ct = net.time_image(t), net.time_image(torch.tensor([30, 40, 45]))
    assert not torch.allclose(level(ci), level(ct))
    # each modality still samples: text -> image, image -> text and joint
    assert sample(m, "image", text=xt[:2], steps=2, guidance=2.0, seed=0).image.shape == (2, 3, 8, 8)
    assert sample(m, "caption", image=torch.rand(2, 3, 8, 8) * 2 - 1, steps=2).text.shape == (2, 8, 8)
    assert sample(m, "joint", n=2, steps=2).image.shape == (2, 3, 8, 8)


def test_unet_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    m = JointDiffusion(_unet(image_target="x0"))
    g = torch.Generator().manual_seed(0)
    from mmfusion.batch import Batch

    ones = torch.ones(8, dtype=torch.bool)
    batch = Batch(
        {"image": torch.rand(8, 3, 8, 8, generator=g) * 2 - 1, "text": torch.randn(8, 8, 8, generator=g)},
        {"image": ones, "text": ones},
    )
    m(batch).loss.backward()
    assert m.net.decoder.out.weight.grad.abs().sum() > 0  # the zero-initialised output conv learns first
    save_diffusion(randomised(m), tmp_path / "model")
    loaded = load_diffusion(tmp_path)
    text = torch.randn(2, 8, 8)
    a = sample(m, "image", text=text, steps=3, guidance=2.0, seed=7)
    b = sample(loaded, "image", text=text, steps=3, guidance=2.0, seed=7)
    assert torch.equal(a.image, b.image)


def test_image_summary_starts_as_a_no_op_and_reaches_every_text_token():
    torch.manual_seed(0)
    plain = randomised(JointDiffusion(tiny_config())).net
    torch.manual_seed(0)
    with_summary = JointDiffusion(tiny_config(image_summary=True)).net
    with_summary.load_state_dict(plain.state_dict(), strict=False)
    xi, xt = _inputs(2)
    t = torch.tensor([10, 20])
    torch.testing.assert_close(with_summary(xi, xt, t, t).eps_text, plain(xi, xt, t, t).eps_text)
    with_summary.image_summary[2].weight.data.normal_()
    seen = transformer_inputs({"summary": with_summary, "plain": plain}, xi, xt, t, t)
    pooled = with_summary.image_in(xi).mean(dim=1)
    extra = with_summary.image_summary(torch.cat([pooled, with_summary.time_image(t)], dim=1))
    torch.testing.assert_close(seen["summary"][:, 4:] - seen["plain"][:, 4:], extra[:, None].expand(2, 8, 16))
    torch.testing.assert_close(seen["summary"][:, :4], seen["plain"][:, :4])  # image tokens unchanged


def test_unet_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="image_net unet needs patch a power of 2 >= 2; got 3"):
        tiny_config(image_size=9, patch=3, image_net="unet")
    with pytest.raises(ValidationError, match="image_net unet needs image_latent pixels"):
        tiny_config(image_net="unet", image_latent="autoencoder", ae_latent_dim=8, ae_tokens=2)
