"""Per-modality decoding and normalisation on hand-made bytes, with exact expected outputs."""

import io

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmfusion.data.engine.process import (
    Unusable,
    clean_text,
    process_audio,
    process_image,
    process_text,
    process_video,
)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_text_is_nfc_cleaned_and_collapsed():
    raw = "  Cafe\u0301\x00 au\tlait\u200b\r\n ok ".encode()
    assert process_text(raw) == "Caf\u00e9 au lait ok"  # NFC é, NUL and zero-width space gone
    assert process_text("\ufeffhi".encode()) == "hi"  # a UTF-8 BOM is not part of the caption
    assert clean_text("a\u00a0b") == "a b"  # non-breaking space is whitespace


def test_non_utf8_text_names_the_byte():
    with pytest.raises(Unusable) as e:
        process_text(b"ok \xff\xfe")
    assert e.value.reason == "non_utf8_text"
    assert e.value.detail == "not UTF-8: byte 0xff at offset 3 (invalid start byte)"


def test_image_is_rgb_centre_cropped_square():
    arr = np.zeros((20, 40, 4), dtype=np.uint8)  # RGBA, wide: left half red, right half blue, opaque
    arr[:, :20] = (255, 0, 0, 255)
    arr[:, 20:] = (0, 0, 255, 255)
    arr[:, 10:30, 1] = 0
    pixels, original = process_image(_encode(Image.fromarray(arr, "RGBA"), "PNG"), 10)
    assert original == (40, 20) and pixels.shape == (10, 10, 3) and pixels.dtype == np.uint8
    # the centre crop keeps x in [10, 30): left half red, right half blue
    assert tuple(pixels[5, 1]) == (255, 0, 0) and tuple(pixels[5, 8]) == (0, 0, 255)


def test_truncated_and_empty_images_are_unreadable():
    data = _encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(Unusable, match="unreadable: cannot decode image"):
        process_image(data[: len(data) // 2], 32)
    with pytest.raises(Unusable, match="empty file"):
        process_image(b"", 32)


def test_audio_is_mono_resampled_and_trimmed():
    sr = 8000
    tone = 0.5 * np.sin(2 * np.pi * 500 * np.arange(800) / sr)
    wave = np.concatenate([np.zeros(400), tone, np.zeros(400)])
    stereo = np.stack([wave, wave * 0.5], axis=1).astype(np.float32)  # mono = 0.75 x wave
    buf = io.BytesIO()
    sf.write(buf, stereo, sr, format="WAV", subtype="FLOAT")
    out, seconds, peak = process_audio(buf.getvalue(), 16000, 1e-3, 30.0)
    assert seconds == pytest.approx(0.2) and peak == pytest.approx(0.375, abs=1e-4)
    assert out.dtype == np.float32
    # 800 tone samples at 8 kHz -> 1600 at 16 kHz once the silence on both sides is trimmed, plus the
    # resampling filter's ringing above the trim level at the tone's abrupt edges (~22 samples each side)
    assert 1600 <= out.shape[0] <= 1660
    assert np.abs(out).max() == pytest.approx(0.375, abs=5e-3)
    cut, _, _ = process_audio(buf.getvalue(), 16000, 1e-3, 0.05)
    assert cut.shape[0] == 800  # max_seconds 0.05 at 16 kHz


def test_broken_audio_is_unreadable():
    with pytest.raises(Unusable, match="cannot decode audio"):
        process_audio(b"RIFF\x00\x00\x00\x00WAVEjunk", 16000, 1e-3, 30.0)


def test_video_frames_are_sampled_uniformly_and_resized():
    clip = np.zeros((5, 8, 8, 3), dtype=np.uint8)
    for t in range(5):
        clip[t] = t * 50
    buf = io.BytesIO()
    np.save(buf, clip)
    out = process_video(buf.getvalue(), 3, 4)
    assert out.shape == (3, 4, 4, 3)
    assert [int(f[0, 0, 0]) for f in out] == [0, 100, 200]  # frames 0, 2, 4
    buf = io.BytesIO()
    np.save(buf, np.zeros((5, 8, 8), dtype=np.uint8))
    # the shared decoder's words (mmfusion.modalities.video.decode_video), as the engine's `unreadable`
    with pytest.raises(
        Unusable, match=r"unreadable: expected a \(T, H, W, 3\) uint8 array, got shape \(5, 8, 8\)"
    ):
        process_video(buf.getvalue(), 3, 4)
    with pytest.raises(Unusable, match="unreadable: empty file"):
        process_video(b"", 3, 4)
    with pytest.raises(Unusable, match="unreadable: cannot load array"):
        process_video(b"\x93NUMPY junk", 3, 4)
