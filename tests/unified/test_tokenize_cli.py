"""The tokenizer CLI's file readers: the modalities' decoders, their MediaError as the CLI's DataError lines."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmfusion.errors import DataError
from mmfusion.modalities.audio import AudioFrontEnd
from mmfusion.unified.tokenize_cli import load_audios, load_images


def test_load_images_reads_through_decode_image(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, half of it fully transparent
    rgba[:, :2, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    x = load_images([("a", tmp_path / "a.png"), ("a", io.BytesIO((tmp_path / "a.png").read_bytes()))], 4)
    assert x.shape == (2, 3, 4, 4) and torch.equal(x[0], x[1])
    # transparent pixels are composited on black (the image modality's rule), opaque ones kept
    assert x[0, 0, :, :2].eq(1).all() and x[0, 0, :, 2:].eq(-1).all() and x[0, 1:].eq(-1).all()
    with pytest.raises(DataError, match=r"^cannot read image .*bad\.png: cannot identify image file"):
        load_images([("bad", tmp_path / "bad.png")], 4)


def test_load_audios_reads_through_decode_audio(tmp_path):
    fe = AudioFrontEnd(n_mels=16, seconds=0.1)
    t = np.arange(1600, dtype=np.float32) / 16000
    left = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    sf.write(tmp_path / "mono.wav", left, 16000, subtype="FLOAT")
    sf.write(tmp_path / "stereo.wav", np.stack([left, np.zeros_like(left)], 1), 16000, subtype="FLOAT")
    spec = load_audios([("m", tmp_path / "mono.wav"), ("s", tmp_path / "stereo.wav")], fe)
    assert spec.shape == (2, 1, 16, 12)
    assert torch.equal(spec[0], fe([left], 16000)[0])
    assert torch.allclose(spec[1], fe([0.5 * left], 16000)[0])  # channels averaged
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(160, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....not a wav")
    with pytest.raises(DataError, match=r"^audio .*empty\.wav has no samples$"):
        load_audios([("e", tmp_path / "empty.wav")], fe)
    with pytest.raises(DataError, match=r"^audio contains NaN or infinite samples$"):
        load_audios([("n", tmp_path / "nan.wav")], fe)
    with pytest.raises(DataError, match=r"^cannot read audio .*junk\.wav: "):
        load_audios([("j", tmp_path / "junk.wav")], fe)
