import math

import numpy as np
import pytest
import torch

from mmfusion.data.synthetic import PITCH, Obj, Scene, SyntheticWorld
from mmfusion.errors import DataError
from mmfusion.modalities.audio import (
    AudioEncoder,
    hz_to_mel,
    mel_filterbank,
    mel_to_hz,
    preprocess_audio,
    preprocess_audios,
    resample,
    to_mono_float,
)


def tone(freq: float, rate: int, seconds: float) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)).astype(np.float32)


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(wave.shape[0], dtype=torch.float64)).abs()
    return float(spectrum.argmax()) * rate / wave.shape[0]


def test_resample_keeps_pitch_and_length():
    x = torch.from_numpy(tone(440.0, 44100, 1.0))
    y = resample(x, 44100, 16000)
    assert y.shape == (16000,)
    assert peak_hz(y, 16000) == pytest.approx(440.0, abs=1.0)
    assert float(y[2000:-2000].abs().max()) == pytest.approx(0.5, abs=0.01)  # passband gain ~1
    up = resample(torch.from_numpy(tone(440.0, 8000, 0.5)), 8000, 16000)
    assert up.shape == (8000,) and peak_hz(up, 16000) == pytest.approx(440.0, abs=2.0)
    # a 10 kHz tone is above the 8 kHz Nyquist of 16 kHz: it must be removed, not aliased to 6 kHz
    alias = resample(torch.from_numpy(tone(10000.0, 44100, 0.5)), 44100, 16000)
    assert float(alias[500:-500].abs().max()) < 0.01
    # a rate with no common factor with the target (gcd 1): fast and small with soxr (a gcd-reduced polyphase
    # kernel would need 16000 x 44099 taps); batched (..., n) input keeps its leading dims
    odd = resample(
        torch.from_numpy(np.stack([tone(440.0, 44099, 1.0), tone(880.0, 44099, 1.0)])), 44099, 16000
    )
    assert odd.shape == (2, 16000) and odd.dtype == torch.float32
    assert peak_hz(odd[0], 16000) == pytest.approx(440.0, abs=1.0)
    assert peak_hz(odd[1], 16000) == pytest.approx(880.0, abs=1.0)


def test_mel_scale_and_filterbank_properties():
    assert float(hz_to_mel(1000.0)) == pytest.approx(1000.0, abs=0.05)  # HTK: 1000 Hz is 1000 mel
    assert float(mel_to_hz(hz_to_mel(3456.0))) == pytest.approx(3456.0)
    n_mels, n_fft, rate = 20, 4096, 16000
    fb = mel_filterbank(n_mels, n_fft, rate)
    assert fb.shape == (n_mels, n_fft // 2 + 1)
    assert fb.min() >= 0 and fb.max() <= 1
    bin_hz = rate / n_fft
    centres = mel_to_hz(torch.linspace(0, float(hz_to_mel(rate / 2)), n_mels + 2))[1:-1]
    # each triangle peaks at its mel centre (within one FFT bin: the sides have unequal slopes), height ~1
    assert torch.all((fb.argmax(dim=1) - centres / bin_hz).abs() < 1)
    assert torch.all(fb.max(dim=1).values > 0.95)
    # adjacent triangles overlap into a partition of unity between the first and the last centre
    inner = slice(int(centres[0] / bin_hz) + 1, int(centres[-1] / bin_hz))
    assert torch.allclose(fb[:, inner].sum(dim=0), torch.ones(1), atol=1e-5)
    assert mel_filterbank(64, 400, 16000).amax(dim=1).min() > 0  # the defaults leave no filter empty


def test_mono_dtypes_and_layouts():
    left = np.full(100, 0.5, np.float32)
    stereo = np.stack([left, -left])
    assert torch.equal(to_mono_float(stereo), torch.zeros(100))
    assert torch.equal(to_mono_float(stereo.T), torch.zeros(100))  # soundfile (n, channels) layout
    assert float(to_mono_float(np.array([-32768, 16384], np.int16))[0]) == -1.0
    with pytest.raises(DataError, match="non-empty"):
        to_mono_float(np.zeros(0, np.float32))
    with pytest.raises(DataError, match="NaN"):
        to_mono_float(np.array([0.0, np.nan]))


def test_preprocess_shapes_and_padding():
    mel = preprocess_audio(tone(440.0, 44100, 0.3), 44100, seconds=0.5)
    assert mel.shape == (64, 51)  # 8000 samples, hop 160, centred frames
    silence = float(preprocess_audio(np.zeros(10, np.float32), 16000, seconds=0.5).max())
    assert silence == pytest.approx((math.log(1e-6) + 7.0) / 4.0)
    assert torch.allclose(mel[:, -10:], torch.full((64, 10), silence))  # zero-padded tail is silence
    stereo = np.stack([tone(440.0, 16000, 0.5)] * 2)
    assert torch.allclose(
        preprocess_audio(stereo, 16000, seconds=0.5), preprocess_audio(stereo[0], 16000, seconds=0.5)
    )
    mels, lengths = preprocess_audios(
        [tone(440.0, 16000, 0.2), tone(440.0, 22050, 0.5)], [16000, 22050], seconds=None, n_mels=32
    )
    assert mels.shape == (2, 32, 51) and lengths.tolist() == [21, 51]
    assert torch.allclose(mels[0, :, 21:], torch.full((32, 30), silence))


def test_synthetic_world_pitch_moves_the_peak_mel_bin_up():
    world = SyntheticWorld()

    def peak_bin(colour: str) -> int:
        scene = Scene((Obj("circle", colour, "large", 0.5, 0.5),))
        mel = preprocess_audio(world.render_audio(scene), world.config.audio_sample_rate, seconds=0.5)
        return int(mel[:, 5:-5].mean(dim=1).argmax())

    assert PITCH["red"] < PITCH["yellow"] < PITCH["white"]
    assert peak_bin("red") < peak_bin("yellow") < peak_bin("white")
    small = world.render_audio(Scene((Obj("circle", "red", "small", 0.5, 0.5),)))
    large = world.render_audio(Scene((Obj("circle", "red", "large", 0.5, 0.5),)))
    # fixed (not per-utterance) normalisation keeps loudness: larger objects have higher log-mel energy
    assert (
        preprocess_audio(large, 16000, seconds=0.5).max() > preprocess_audio(small, 16000, seconds=0.5).max()
    )


@pytest.mark.parametrize("backbone", ["transformer", "gru"])
def test_encoder_shapes_and_padding_is_masked(backbone):
    torch.manual_seed(0)
    enc = AudioEncoder(
        n_mels=16, width=32, depth=2, heads=4, embed_dim=8, max_frames=51, backbone=backbone
    ).eval()
    mels = torch.randn(3, 16, 51)
    assert enc.forward_tokens(mels).shape == (3, 13, 32)  # 51 -> 26 -> 13 tokens
    assert enc(mels).shape == (3, 8)
    # a short clip encodes the same alone and right-padded with garbage in a batch
    short = mels[:1, :, :30]
    padded = torch.cat([short, torch.randn(1, 16, 21) * 100], dim=2)
    batch = torch.cat([padded, mels[1:]])
    lengths = torch.tensor([30, 51, 51])
    with torch.no_grad():
        alone, batched = enc(short), enc(batch, lengths)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(enc(mels[1:]), batched[1:], atol=1e-5)
    assert enc.token_lengths(lengths).tolist() == [8, 13, 13]
    with pytest.raises(DataError, match="lengths"):
        enc(mels, torch.tensor([0, 51, 51]))
    with pytest.raises(DataError, match="max_frames"):
        enc(torch.randn(1, 16, 52))


def test_encoder_trains_on_pitch():
    torch.manual_seed(0)
    world = SyntheticWorld()
    colours = ["red", "white"]
    waves = [
        world.render_audio(Scene((Obj("square", c, s, 0.5, 0.5),)))
        for c in colours
        for s in ("small", "large")
    ]
    mels, _ = preprocess_audios(waves, 16000, seconds=0.5, n_mels=32)
    labels = torch.tensor([0, 0, 1, 1])
    enc = AudioEncoder(n_mels=32, width=32, depth=1, heads=4, embed_dim=2, max_frames=51)
    opt = torch.optim.AdamW(enc.parameters(), lr=3e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(enc(mels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
