"""The image and text latents: exact round-trips and the errors people see."""

from __future__ import annotations

import pytest
import torch

from mmfusion.data.synthetic import TEMPLATES
from mmfusion.diffusion.latents import (
    ImageAutoencoder,
    TextCodec,
    canonical_caption,
    caption_words,
    patchify,
    unpatchify,
    world_vocabulary,
)
from mmfusion.errors import ConfigError, DataError


def test_patchify_layout_and_round_trip():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 (top row, second column) of image 0: channel 0 pixels (0,2),(0,3),(1,2),(1,3) come first
    assert p[0, 1, :4].tolist() == [2.0, 3.0, 6.0, 7.0]
    assert torch.equal(unpatchify(p, 2), x)
    with pytest.raises(DataError, match="not divisible by patch 3"):
        patchify(x, 3)


def test_text_codec_round_trip_on_every_template():
    codec = TextCodec(text_len=24, dim=16, seed=0, canonical=False)
    caps = [
        t.format("small red circle", "large blue square", "small cyan cross")
        for ts in TEMPLATES.values()
        for t in ts
    ]
    lat = codec.encode(caps)
    assert lat.shape == (len(caps), 24, 16)
    assert codec.decode(lat) == [" ".join(caption_words(c)) for c in caps]
    # rows have norm sqrt(dim): unit scale per entry, like the diffusion noise
    torch.testing.assert_close(codec.table.norm(dim=1), torch.full((len(codec.vocab),), 4.0))
    # small perturbations still round to the same words
    noisy = lat + 0.1 * torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    assert codec.decode(noisy) == codec.decode(lat)


def test_canonical_codec_states_content_not_paraphrase():
    codec = TextCodec(text_len=24, dim=16)
    objs = ("small red circle", "large blue square", "small cyan cross")
    for ts in TEMPLATES.values():
        caps = [t.format(*objs) for t in ts]
        want = " ".join(caption_words(ts[0].format(*objs)))
        assert codec.decode(codec.encode(caps)) == [want] * len(caps)
    assert canonical_caption("there is a large white diamond") == "a large white diamond"
    assert canonical_caption("Hello, world") == "hello world"  # unparsed text keeps its own words


def test_text_codec_errors_and_vocabulary():
    codec = TextCodec(text_len=4, dim=8)
    assert world_vocabulary()[0] == "<pad>" and "circle" in codec.vocab and "middle" in codec.vocab
    with pytest.raises(DataError, match=r"words \['dog'\] are not in"):
        codec.encode(["a small red dog"])
    with pytest.raises(DataError, match="has 7 words; text_len is 4"):
        codec.encode(["a small red circle on a dark"])
    assert TextCodec(4, 8, seed=0).table.equal(codec.table)
    assert not TextCodec(4, 8, seed=1).table.equal(codec.table)


def test_image_autoencoder_normalises_its_latent_and_learns():
    torch.manual_seed(0)
    ae = ImageAutoencoder(image_size=8, latent_dim=6, tokens=2, channels=4)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    before = torch.nn.functional.mse_loss(ae.decoder(ae.encoder(images)), images).item()
    ae.fit(images, steps=60, batch_size=16, lr=1e-2, noise=0.0)
    assert not any(p.requires_grad for p in ae.parameters())
    z = ae.encode(images)
    assert z.shape == (40, 2, 3)
    # encode removes the training latents' per-entry mean and std; decode restores them
    torch.testing.assert_close(z.flatten(1).mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.flatten(1).std(0), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(ae.decode(z), ae.decoder(ae.encoder(images)), atol=1e-5, rtol=0)
    after = torch.nn.functional.mse_loss(ae.decode(z), images).item()
    assert after < before


def test_image_autoencoder_refuses_sizes_it_cannot_take():
    with pytest.raises(ConfigError, match="image_size divisible by 8; got 12"):
        ImageAutoencoder(image_size=12)
    with pytest.raises(ConfigError, match="ae_latent_dim = 10 is not divisible by ae_tokens = 4"):
        ImageAutoencoder(latent_dim=10, tokens=4)
