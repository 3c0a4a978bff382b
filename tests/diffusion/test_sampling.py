"""DDIM sampling: the classifier-free guidance trick equals its formula; determinism; shapes; errors."""

from __future__ import annotations

import pytest
import torch

from mmfusion.diffusion.latents import patchify
from mmfusion.diffusion.sampling import guided_eps, sample
from mmfusion.errors import ConfigError


def test_guidance_is_the_max_noise_formula(tiny_model):
    net, cfg = tiny_model.ema_net, tiny_model.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cfg.image_tokens, 48, generator=g)
    cond = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g)
    null = torch.randn(cond.shape, generator=g)
    t = torch.full((3,), 20)
    eps_c = net(x, cond, t, torch.full((3,), -1)).eps_image
    eps_u = net(x, null, t, torch.full((3,), 49)).eps_image  # the text at max noise: "no text"
    got = guided_eps(net, "image", x, cond, 20, 3.0, null)
    torch.testing.assert_close(got, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided_eps(net, "image", x, cond, 20, 1.0, null), eps_c)
    # image -> text: the image is the condition
    xt, ci = torch.randn(3, cfg.text_len, cfg.text_dim, generator=g), x
    nulli = torch.randn(ci.shape, generator=g)
    eps_c = net(ci, xt, torch.full((3,), -1), t).eps_text
    eps_u = net(nulli, xt, torch.full((3,), 49), t).eps_text
    got = guided_eps(net, "caption", xt, ci, 20, 2.0, nulli)
    torch.testing.assert_close(got, eps_u + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


def test_sampling_shapes_and_determinism(tiny_model):
    cfg = tiny_model.cfg
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    a = sample(tiny_model, "image", text=text, steps=4, guidance=3.0, seed=1)
    b = sample(tiny_model, "image", text=text, steps=4, guidance=3.0, seed=1)
    c = sample(tiny_model, "image", text=text, steps=4, guidance=3.0, seed=2)
    assert (
        a.image.shape == (2, 3, 8, 8) and torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)
    )
    assert a.image.min() >= -1 and a.image.max() <= 1 and torch.equal(a.text, text)
    cap = sample(tiny_model, "caption", image=a.image, steps=3, seed=0)
    assert cap.text.shape == (2, cfg.text_len, cfg.text_dim) and torch.equal(cap.image, a.image)
    j = sample(tiny_model, "joint", n=5, steps=3, eta=1.0, seed=0)
    assert j.image.shape == (5, 3, 8, 8) and j.text.shape == (5, 8, 8)


def test_one_step_ddim_sample_is_the_x0_estimate(tiny_model):
    """One DDIM step from T - 1 returns the denoiser's x0 estimate at T - 1 (clamped to [-1, 1])."""
    cfg, net = tiny_model.cfg, tiny_model.ema_net
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    got = sample(tiny_model, "image", text=text, steps=1, seed=4, clip=None)
    x = torch.randn(2, cfg.image_tokens, 48, generator=torch.Generator().manual_seed(4))
    eps = net(x, text, torch.full((2,), 49), torch.full((2,), -1)).eps_image
    x0 = tiny_model.schedule.predict_x0(x, torch.full((2,), 49), eps)
    torch.testing.assert_close(patchify(got.image, 4), x0.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_sampling_errors(tiny_model):
    with pytest.raises(ConfigError, match="needs its condition"):
        sample(tiny_model, "image")
    with pytest.raises(ConfigError, match="needs n >= 1"):
        sample(tiny_model, "joint")
    with pytest.raises(ConfigError, match="expected one of image, caption, joint"):
        sample(tiny_model, "video", n=1)
