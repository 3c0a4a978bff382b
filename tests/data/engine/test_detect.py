"""Modality detection from bytes: signatures beat extensions, and a disagreement is reported."""

import io

import numpy as np
import soundfile as sf
from PIL import Image

from mmfusion.data.engine.detect import Detection, declared_modality, detect


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    return buf.getvalue()


def _wav() -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(8, dtype=np.float32), 8000, format="WAV")
    return buf.getvalue()


def test_declared_modality_from_extension():
    assert [declared_modality(n) for n in ("a.JPG", "b.flac", "c.npy", "d.txt", "e.mp4", "f.md", "g")] == [
        "image",
        "audio",
        "video",
        "text",
        "unsupported",
        None,
        None,
    ]


def test_matching_content_is_not_mislabelled():
    assert detect(_png(), "cat.png") == Detection("image", "png", "image", False)
    assert detect(_wav(), "cat.wav") == Detection("audio", "wav", "audio", False)
    assert detect(b"a cat", "cat.txt") == Detection("text", "text", "text", False)


def test_wav_named_png_is_audio_and_mislabelled():
    det = detect(_wav(), "beep.png")
    assert det == Detection("audio", "wav", "image", True)
    assert det.note("beep.png") == "beep.png: mislabelled: name says image, content is audio (wav)"


def test_wrong_format_within_a_modality_is_mislabelled():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="JPEG")
    assert detect(buf.getvalue(), "x.png") == Detection("image", "jpeg", "image", True)
    assert detect(buf.getvalue(), "x.jpg").mislabelled is False


def test_other_signatures_and_unknown_bytes():
    assert detect(b"\x93NUMPY\x01\x00", "clip.npy").modality == "video"
    assert detect(b"\x00\x00\x00\x18ftypmp42", "clip.mp4") == Detection(
        "unsupported", "mp4", "unsupported", False
    )
    assert detect(b"\x00\x01\x02binary", "blob.bin") == Detection(None, None, None, False)
    assert detect(b"", "empty.txt") == Detection("text", None, "text", False)  # an empty caption stays text
    assert detect(b"hello", "x.png") == Detection("text", "text", "image", True)
