import json
import math

import numpy as np
import pytest
import torch

from mmfusion.data.synthetic import SyntheticWorld
from mmfusion.errors import ConfigError, DataError
from mmfusion.modalities.audio import (
    SPEC_HIGH,
    SPEC_LOW,
    AudioFrontEnd,
    denormalize_log_mel,
    normalize_log_mel,
    preprocess_audios,
)
from mmfusion.models.quantizers import FSQ, VectorQuantizer, codebook_usage
from mmfusion.models.residual_vq import ResidualVQ
from mmfusion.models.vq import VQVAE, psnr
from mmfusion.models.vq_library import LibFSQ, LibVectorQuantizer


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _images(n: int, split: str = "train") -> torch.Tensor:
    world = SyntheticWorld()
    arr = np.stack([world.sample(split, i, ("image",))["image"] for i in range(n)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_indices_to_codes_round_trip(kind):
    z = torch.randn(4, 5, 3)
    q = {"vq": lambda: VectorQuantizer(3, 16), "rvq": lambda: ResidualVQ(3, 16, 3), "fsq": FSQ}[kind]()
    q.train()
    q(z)  # k-means init / EMA update
    q.eval()
    z_q, indices, info = q(z)
    assert indices.shape[:2] == (4, 5)
    assert (q.indices_to_codes(indices) - z_q).abs().max().item() < 1e-6
    assert 1.0 <= info["perplexity"] <= q.codebook_size
    assert 0.0 < info["usage"] <= 1.0


def test_straight_through_and_commitment():
    vq = VectorQuantizer(4, 8, commitment=0.5)
    z = torch.randn(10, 4, requires_grad=True)
    z_q, _, info = vq(z)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    expected = 0.5 * ((z.detach() - vq.indices_to_codes(vq.eval()(z)[1])) ** 2).mean()
    assert info["commit_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_ema_update_hand_made():
    vq = VectorQuantizer(2, 2, decay=0.5, eps=0.0, kmeans_init=False, dead_code_threshold=0.0)
    vq.embed.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    vq.embed_avg.copy_(vq.embed)
    vq.cluster_size.fill_(1.0)
    z = torch.tensor([[0.2, 0.0], [0.8, 1.0], [1.0, 1.2]])
    _, idx, _ = vq(z)
    assert idx.tolist() == [0, 1, 1]  # quantized with the pre-update codebook
    # counts [1, 2]; cluster_size = .5*[1,1] + .5*[1,2]; embed_avg = .5*old + .5*sums
    assert torch.allclose(vq.cluster_size, torch.tensor([1.0, 1.5]))
    assert torch.allclose(vq.embed_avg, torch.tensor([[0.1, 0.0], [1.4, 1.6]]))
    assert torch.allclose(vq.embed, torch.tensor([[0.1, 0.0], [1.4 / 1.5, 1.6 / 1.5]]), atol=1e-6)
    vq.eval()
    before = vq.embed.clone()
    vq(z)
    assert torch.equal(vq.embed, before)  # no update in eval mode


def _set_codebook(vq, embed, counts):
    vq.embed.copy_(embed)
    vq.cluster_size.copy_(counts)
    vq.embed_avg.copy_(embed * counts[:, None])


def test_dead_code_replacement_revives_unused_codes():
    z = 0.1 * torch.randn(64, 3)
    vq = VectorQuantizer(3, 8, kmeans_init=False, dead_code_threshold=1.0)
    far = torch.full((8, 3), 100.0)
    far[0] = 0.0
    _set_codebook(vq, far, torch.tensor([64.0] + [0.0] * 7))
    _, idx, info = vq(z)
    assert set(idx.tolist()) == {0} and info["replaced"] == 7
    for k in range(1, 8):  # each revived code is one of the batch vectors
        assert (vq.embed[k] == z).all(dim=1).any()
    _, idx, _ = vq(z)
    assert len(set(idx.tolist())) > 4

    # control: without replacement the far codes stay dead
    dead = VectorQuantizer(3, 8, kmeans_init=False, dead_code_threshold=0.0)
    _set_codebook(dead, far, torch.tensor([64.0] + [1.0] * 7))
    for _ in range(3):
        _, idx, info = dead(z)
    assert set(idx.tolist()) == {0} and info["replaced"] == 0


def test_dead_code_patience():
    z = 0.1 * torch.randn(32, 2)
    vq = VectorQuantizer(2, 4, kmeans_init=False, dead_code_threshold=0.0, dead_code_patience=2)
    far = torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]])
    _set_codebook(vq, far, torch.tensor([32.0, 1.0, 1.0, 1.0]))
    vq(z)
    assert torch.all(vq.embed[1:] > 10)  # unused for 1 step: kept
    _, _, info = vq(z)
    assert info["replaced"] == 3 and torch.all(vq.embed[1:].abs() < 1)


def test_kmeans_init_puts_codes_on_data():
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    z = (centres[:, None, :] + 0.05 * torch.randn(4, 50, 2)).reshape(-1, 2)
    vq = VectorQuantizer(2, 4, dead_code_threshold=0.0)
    assert not bool(vq.initted)
    _, idx, info = vq(z[torch.randperm(200)])
    assert bool(vq.initted)
    d = torch.cdist(vq.embed, centres)
    assert d.min(dim=1).values.max().item() < 0.1  # every code sits on a cluster
    assert sorted(d.argmin(dim=1).tolist()) == [0, 1, 2, 3]  # one code per cluster
    assert info["usage"] == 1.0


def test_fsq_levels_and_code_count():
    fsq = FSQ([8, 6, 5])
    assert fsq.codebook_size == 240 and fsq.dim == 3
    codes = fsq.indices_to_codes(torch.arange(240))
    assert len({tuple(c.tolist()) for c in codes}) == 240
    for ch, lv in enumerate([8, 6, 5]):
        assert len(codes[:, ch].unique()) == lv
        assert codes[:, ch].min() == -1.0 and codes[:, ch].max() <= 1.0
    assert torch.equal(fsq.codes_to_indices(codes), torch.arange(240))
    z_q, idx, _ = fsq(1.5 * torch.randn(5000, 3))
    assert idx.min() >= 0 and idx.max() < 240
    assert len(idx.unique()) > 200  # wide inputs reach (nearly) every code
    z = torch.randn(6, 3, requires_grad=True)
    fsq(z)[0].sum().backward()
    assert z.grad.abs().sum() > 0


def test_rvq_error_non_increasing_with_depth():
    z = torch.randn(512, 8)
    rvq = ResidualVQ(8, 16, num_levels=4, dead_code_threshold=0.0)
    rvq(z)  # k-means init of every level on this input's residuals
    rvq.eval()
    errors = [((rvq(z, num_levels=n)[0] - z) ** 2).mean().item() for n in range(1, 5)]
    assert all(b <= a + 1e-7 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.8 * errors[0]
    _, idx, info = rvq(z)
    assert idx.shape == (512, 4) and len(info["levels"]) == 4


def test_usage_stats():
    s = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert s["usage"] == 0.5 and s["perplexity"] == pytest.approx(4.0)
    assert s["normalized_perplexity"] == pytest.approx(0.5)


def test_range_check_names_the_range():
    model = VQVAE(channels=8, codebook_size=16, code_dim=4)
    with pytest.raises(DataError, match=r"\[-1, 1\].*\[0, 255\]"):
        model.encode(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(DataError, match=r"\[-1, 1\]"):
        model.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert model.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8)
    assert model.tokens_per_image == 64


@pytest.mark.parametrize("quantizer", ["vq", "rvq", "fsq"])
def test_save_load_round_trip(tmp_path, quantizer):
    model = VQVAE(channels=8, codebook_size=16, code_dim=4, quantizer=quantizer, rvq_levels=2)
    x = _images(4)
    model(x)  # initialise / update the codebook
    model.eval()
    idx = model.encode(x)
    model.save_pretrained(tmp_path)
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.encode(x), idx)
    assert torch.equal(loaded.decode(idx), model.decode(idx))


def test_short_training_improves_psnr():
    x = _images(64)
    model = VQVAE(channels=16, codebook_size=32, code_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(60):
        batch = x[torch.randint(0, 64, (16,), generator=g)]
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step == 0:
            first = psnr(out.recon.detach(), batch)
    model.eval()
    with torch.no_grad():
        final = psnr(model.decode(model.encode(x)), x)
    assert final > first + 3.0, (first, final)


# ---- audio spectrograms: VQVAE(in_channels=1, input_shape=...) + AudioFrontEnd -------------------------------


@pytest.fixture(scope="module")
def clips():
    """12 synthetic-world clips (0.5 s, 16 kHz) and their project log-mels (12, 64, 51)."""
    world = SyntheticWorld()
    waves = [world.sample("train", i, ("audio",))["audio"] for i in range(12)]
    return waves, preprocess_audios(waves, 16000, seconds=0.5)[0]


def test_log_mel_normalisation_exact_and_invertible():
    x = torch.tensor([SPEC_LOW, SPEC_HIGH, (SPEC_LOW + SPEC_HIGH) / 2, SPEC_LOW - 1.0, 0.0])
    y = normalize_log_mel(x)
    assert y[:4].tolist() == pytest.approx([-1.0, 1.0, 0.0, -1.0], abs=1e-6)  # below silence clamps to -1
    assert y[4].item() == pytest.approx(2 * (0 - SPEC_LOW) / (SPEC_HIGH - SPEC_LOW) - 1, abs=1e-6)
    assert SPEC_LOW == pytest.approx((math.log(1e-6) + 7.0) / 4.0) and SPEC_HIGH == 1.75
    assert torch.allclose(denormalize_log_mel(y[:3]), x[:3], atol=1e-6)


def test_audio_front_end_shapes_range_and_inverse(clips):
    waves, mels = clips
    fe = AudioFrontEnd()
    assert (fe.frames, fe.shape) == (51, (64, 52))
    x = fe(waves, 16000)
    assert x.shape == (12, 1, 64, 52) and x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(x[..., 51:], torch.full_like(x[..., 51:], -1.0))  # padded with silence
    assert torch.allclose(fe.inverse(x), mels.clamp(SPEC_LOW, SPEC_HIGH), atol=1e-5)
    assert mels.max() < SPEC_HIGH  # the clamp at the top never bites on [-1, 1] waveforms
    # the same clip as stereo int16 at 8 kHz goes through the same front end
    pcm = (np.stack([waves[0], waves[0]]) * 32767).astype(np.int16)[:, ::2]
    assert fe([pcm], 8000).shape == (1, 1, 64, 52)
    with pytest.raises(ConfigError, match="n_mels"):
        AudioFrontEnd(n_mels=30)


@pytest.mark.parametrize("quantizer,code_shape", [("vq", (16, 13)), ("rvq", (16, 13, 2)), ("fsq", (16, 13))])
def test_spectrogram_vqvae_round_trip_shapes(clips, quantizer, code_shape):
    x = AudioFrontEnd()(clips[0][:4], 16000)
    model = VQVAE(
        channels=8, codebook_size=16, code_dim=4, quantizer=quantizer, rvq_levels=2, in_channels=1,
        input_shape=(64, 52),
    )  # fmt: skip
    out = model(x)
    assert out.recon.shape == x.shape and out.indices.shape == (4, *code_shape)
    assert model.code_shape == code_shape and model.tokens_per_image == 16 * 13 and model.grid is None
    model.eval()
    idx = model.encode(x)
    assert idx.shape == (4, *code_shape)
    assert model.decode(idx).shape == (4, 1, 64, 52)
    with pytest.raises(DataError, match=r"\(B, 1, H, W\)"):
        model.encode(torch.zeros(1, 3, 64, 52))
    with pytest.raises(DataError, match="64x52"):
        model.encode(torch.zeros(1, 1, 64, 48))
    with pytest.raises(ConfigError, match="input_shape"):
        VQVAE(in_channels=1, input_shape=(64, 51))


def test_three_channel_backward_compatible(tmp_path):
    model = VQVAE(channels=8, codebook_size=16, code_dim=4)
    rgb_keys = list(model.state_dict())
    assert model.encoder[0].weight.shape[1] == 3 and model.decoder[-1].weight.shape[0] == 3
    assert list(VQVAE(channels=8, codebook_size=16, code_dim=4, in_channels=1).state_dict()) == rgb_keys
    x = _images(4)
    model(x)
    model.eval()
    model.save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert (cfg["model"]["in_channels"], cfg["model"]["input_shape"]) == (3, None)
    del cfg["model"]["in_channels"], cfg["model"]["input_shape"]  # a tokenizer saved before these keys
    cfg_path.write_text(json.dumps(cfg))
    old = VQVAE.from_pretrained(tmp_path)
    assert old.in_channels == 3 and old.input_shape == (32, 32) and old.grid == 8
    assert torch.equal(old.encode(x), model.encode(x))


def test_short_spectrogram_training_beats_floor():
    """90 steps on 64 clips (16 mels, 0.25 s -> 16 x 28 inputs, K = 16). Measured: held-out PSNR 18.60 dB
    against 14.13 dB for the mean training spectrogram, usage 0.69; floors +3 dB and 0.5."""
    world = SyntheticWorld()
    fe = AudioFrontEnd(n_mels=16, seconds=0.25)
    train = fe([world.sample("train", i, ("audio",))["audio"] for i in range(64)], 16000)
    held = fe([world.sample("test", i, ("audio",))["audio"] for i in range(32)], 16000)
    model = VQVAE(channels=16, codebook_size=16, code_dim=8, in_channels=1, input_shape=fe.shape)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(90):
        out = model(train[torch.randint(0, 64, (16,), generator=g)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        idx = model.encode(held)
        final = psnr(model.decode(idx), held)
    baseline = psnr(train.mean(0, keepdim=True).expand_as(held), held)
    usage = model.quantizer.usage_stats(idx)["usage"]
    assert final > baseline + 3.0, (final, baseline)
    assert usage >= 0.5, usage


# ---- backend "vqtorch" (vector-quantize-pytorch) and the error-weighted dead-code recipe ----------------------


def test_error_weighted_dead_code_sampling_picks_the_worst_served_vector():
    # 31 vectors sit exactly on code 0 (error 0) and one is far from it: with sampling "error" the dead code
    # can only be re-seeded to the far one (probability ~ squared error); "uniform" can pick any
    z = torch.zeros(32, 2)
    z[7] = torch.tensor([3.0, 4.0])
    vq = VectorQuantizer(2, 2, kmeans_init=False, dead_code_threshold=1.0, dead_code_sampling="error")
    _set_codebook(vq, torch.tensor([[0.0, 0.0], [100.0, 100.0]]), torch.tensor([32.0, 0.0]))
    _, idx, info = vq(z)
    assert set(idx.tolist()) == {0} and info["replaced"] == 1
    assert vq.embed[1].tolist() == [3.0, 4.0]
    _, idx, _ = vq(z)
    assert idx[7].item() == 1  # the revived code now serves it
    with pytest.raises(ConfigError, match="dead_code_sampling"):
        VectorQuantizer(2, 2, dead_code_sampling="worst")


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_vqtorch_backend_interface(kind):
    model = VQVAE(channels=8, codebook_size=16, code_dim=4, quantizer=kind, rvq_levels=3, backend="vqtorch")
    assert model.codebook_size == (240 if kind == "fsq" else 16)
    q = model.quantizer
    assert q.dim == (3 if kind == "fsq" else 4)
    x = _images(4)
    out = model(x)  # training: k-means init + EMA update
    assert out.recon.shape == x.shape and out.loss.requires_grad
    assert isinstance(out.info["replaced"], int) and 0 < out.info["usage"] <= 1
    model.eval()
    z = model.encoder(x).permute(0, 2, 3, 1)
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    z_q, indices, info = q(z)
    assert indices.shape == ((4, 8, 8, 3) if kind == "rvq" else (4, 8, 8))
    assert indices.dtype == torch.long and 0 <= indices.min() and indices.max() < model.codebook_size
    assert (q.indices_to_codes(indices) - z_q).abs().max().item() < 1e-6
    assert (model.decode(indices) - model(x).recon.clamp(-1, 1)).abs().max().item() < 1e-5
    stats = q.usage_stats(indices)
    assert stats["usage"] == pytest.approx(info["usage"]) and 1.0 <= stats["perplexity"]
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # eval: codebook untouched
    with pytest.raises(DataError, match=r"\[-1, 1\].*\[0, 255\]"):
        model.encode(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(DataError, match="last dim"):
        q(torch.zeros(2, 5, 7))


def test_vqtorch_vq_straight_through_and_replaced_count():
    vq = LibVectorQuantizer(2, 8, kmeans_init=False, dead_code_threshold=2.0)
    z = torch.randn(16, 2, requires_grad=True)
    before = vq.embed.clone()
    z_q, idx, info = vq(z)
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # plain straight-through (rotation_trick off)
    assert torch.allclose(
        z_q.detach(), before[idx], atol=1e-6
    )  # quantized with the codebook before this step's update
    expected = 0.25 * ((z.detach() - before[idx]) ** 2).mean()
    assert info["commit_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # every code starts at EMA count 1 < 2, so all are dead after the update; the library resets them to
    # batch vectors with count = threshold, and `replaced` (computed here, not by the library) counts them
    assert info["replaced"] == 8
    assert torch.all(vq.vq._codebook.cluster_size == 2.0)
    assert all((vq.embed[k] == z.detach()).all(dim=1).any() for k in range(8))


@pytest.mark.parametrize("kind", ["vq", "rvq", "fsq"])
def test_vqtorch_save_load_round_trip(tmp_path, kind):
    kw = dict(channels=8, codebook_size=16, code_dim=4, quantizer=kind, rvq_levels=2, backend="vqtorch")
    model = VQVAE(**kw, **({"fsq_noise_dropout": 0.5} if kind == "fsq" else {"rotation_trick": True}))
    x = _images(4)
    model(x)
    model.eval()
    idx = model.encode(x)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["model"]
    assert cfg["backend"] == "vqtorch"
    loaded = VQVAE.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.encode(x), idx)
    assert torch.equal(loaded.decode(idx), model.decode(idx))


def test_backend_defaults_and_errors(tmp_path):
    model = VQVAE(channels=8, codebook_size=16, code_dim=4)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["model"]
    # a default model's config.json has no new keys: byte-identical to before the backends
    assert not {"backend", "dead_code_sampling", "rotation_trick", "fsq_noise_dropout"} & set(cfg)
    assert model.backend == "mmfusion" and isinstance(model.quantizer, VectorQuantizer)
    with pytest.raises(ConfigError, match="backend must be one of"):
        VQVAE(backend="faiss")
    with pytest.raises(ConfigError, match="rotation_trick.*vqtorch"):
        VQVAE(rotation_trick=True)
    with pytest.raises(ConfigError, match="dead_code_patience.*mmfusion"):
        VQVAE(backend="vqtorch", dead_code_patience=10)
    with pytest.raises(ConfigError, match="noise_dropout"):
        LibFSQ((8, 6, 5), noise_dropout=1.5)


def test_error_weighted_replacement_serves_rare_clusters():
    """Learned behaviour of the recipe: 120 vectors near the origin and 8 rare far points per step; 8 of 9
    codes start dead. Uniform re-seeding mostly lands on the crowded origin (p = 120/128), where the codes
    then share the mass and stay alive, so rare points stay unserved; error weighting gives each a code."""
    angles = torch.arange(8) * (2 * math.pi / 8)
    far = 10 * torch.stack([angles.cos(), angles.sin()], dim=1)
    errors = {}
    for sampling in ("uniform", "error"):
        torch.manual_seed(0)
        vq = VectorQuantizer(2, 9, kmeans_init=False, dead_code_threshold=1.0, dead_code_sampling=sampling)
        start = torch.full((9, 2), 100.0)
        start[0] = 0.0
        _set_codebook(vq, start, torch.tensor([128.0] + [0.0] * 8))
        for _ in range(20):
            vq(torch.cat([0.01 * torch.randn(120, 2), far]))
        errors[sampling] = torch.cdist(far, vq.embed).min(dim=1).values
    assert errors["error"].max().item() < 0.5
    assert (errors["uniform"] > 2.0).sum().item() >= 4, errors["uniform"]


@pytest.mark.parametrize("backend", ["mmfusion", "vqtorch"])
def test_rvq_quantize_dropout_trains_prefixes_and_eval_uses_all(backend):
    """Train mode: each forward uses the first n ~ U{cutoff..L} levels (the others get no codebook update);
    eval mode and an explicit num_levels are unaffected."""
    rvq = ResidualVQ(4, 8, num_levels=4, backend=backend, quantize_dropout=True)
    z = torch.randn(64, 4)
    rvq(z)  # k-means init of the levels reached
    used = [rvq(z)[1].shape[-1] for _ in range(40)]
    assert set(used) == {1, 2, 3, 4}
    rvq.eval()
    assert rvq(z)[1].shape[-1] == 4 and rvq(z, num_levels=2)[1].shape[-1] == 2
    rvq.train()
    assert rvq(z, num_levels=3)[1].shape[-1] == 3
    cut = ResidualVQ(4, 8, num_levels=4, backend=backend, quantize_dropout=True, quantize_dropout_cutoff=3)
    assert {cut(z)[1].shape[-1] for _ in range(20)} == {3, 4}
    if backend == "mmfusion":  # skipped levels see no batch: their EMA state is unchanged
        vq = ResidualVQ(4, 8, num_levels=2, quantize_dropout=True)
        vq(z, num_levels=2)
        seed = next(s for s in range(100) if torch.manual_seed(s) and int(torch.randint(1, 3, ())) == 1)
        before = [lvl.cluster_size.clone() for lvl in vq.levels]
        z2 = 3 * z + 1
        torch.manual_seed(seed)
        assert vq(z2)[1].shape[-1] == 1
        assert not torch.equal(vq.levels[0].cluster_size, before[0])
        assert torch.equal(vq.levels[1].cluster_size, before[1])


def test_rvq_commitment_per_level_mean_and_depth_one_identity(tmp_path):
    z = torch.randn(32, 4, requires_grad=True)
    losses = {}
    for mode in ("sum", "mean", "final"):
        torch.manual_seed(0)
        rvq = ResidualVQ(4, 8, num_levels=3, commitment_per_level=mode, commitment=0.5)
        z_q, _, info = rvq(z)
        losses[mode] = info["commit_loss"]
    assert torch.allclose(losses["mean"] * 3, losses["sum"])
    # final: one term on the summed codes, and its gradient pulls z towards them (not towards level 1's)
    assert torch.allclose(losses["final"], 0.5 * (z - z_q).pow(2).mean())
    (grad,) = torch.autograd.grad(losses["final"], z)
    assert torch.allclose(grad, (z - z_q).detach() / z.numel())
    assert losses["final"] < losses["sum"] / 3
    # depth 1 with the new options is the plain VectorQuantizer's model, RNG stream included
    out = {}
    for kw in ({}, {"quantize_dropout": True, "commitment_per_level": "mean"}):
        torch.manual_seed(0)
        rvq = ResidualVQ(4, 8, num_levels=1, **kw)
        out[len(kw)] = [rvq(z)[2]["commit_loss"].item() for _ in range(3)] + [torch.rand(()).item()]
    assert out[0] == out[2]
    # config.json: the new keys are written only when set; they need quantizer="rvq"
    model = VQVAE(channels=8, codebook_size=16, code_dim=4, quantizer="rvq", quantize_dropout=True)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["model"]
    assert cfg["quantize_dropout"] is True and "commitment_per_level" not in cfg
    assert VQVAE.from_pretrained(tmp_path).quantizer.quantize_dropout
    assert "quantize_dropout" not in VQVAE(quantizer="rvq").config
    with pytest.raises(ConfigError, match="quantize_dropout.*quantizer='rvq'"):
        VQVAE(quantize_dropout=True)
    with pytest.raises(ConfigError, match="commitment_per_level must be one of"):
        ResidualVQ(4, 8, commitment_per_level="max")
    with pytest.raises(ConfigError, match="quantize_dropout_cutoff"):
        ResidualVQ(4, 8, num_levels=2, quantize_dropout_cutoff=3)
