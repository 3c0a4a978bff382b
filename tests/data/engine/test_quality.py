"""Quality checks: exact verdicts on hand-made content at the thresholds' edges."""

import numpy as np

from mmfusion.data.engine.quality import REASONS, audio_issues, image_issues, text_issues


def test_image_checks():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:, :4] = 4  # std 2.0 exactly
    assert image_issues(img, (32, 32), 32, 2.0) == []
    assert image_issues(img, (31, 64), 32, 2.0) == [("too_small", "image is 31x64, smaller than 32 px")]
    assert image_issues(np.full((8, 8, 3), 7, np.uint8), (64, 64), 32, 2.0) == [
        ("blank_image", "pixel std 0.00 < 2.0")
    ]


def test_audio_checks():
    wave = np.ones(1600, dtype=np.float32)
    assert audio_issues(wave, 16000, 0.5, 1e-3, 0.1) == []
    assert audio_issues(wave, 16000, 5e-4, 1e-3, 0.1) == [("silent_audio", "peak amplitude 5.00e-04 < 1e-03")]
    assert audio_issues(wave[:1599], 16000, 0.5, 1e-3, 0.1) == [
        ("too_short", "0.100 s of sound after trimming, less than 0.1 s")
    ]


def test_text_checks():
    assert text_issues("a cat on a mat", 100, 0.5) == []
    assert text_issues("", 100, 0.5) == [("empty_caption", "caption is empty after cleaning")]
    assert text_issues("abcdef", 5, 0.5) == [("caption_too_long", "6 characters > 5")]
    assert text_issues("ab12", 100, 0.5) == []  # half letters: at the edge, kept
    assert [r for r, _ in text_issues("a123", 100, 0.5)] == ["garbled_caption"]
    assert [r for r, _ in text_issues("caf\ufffd au lait", 100, 0.5)] == ["garbled_caption"]


def test_every_reason_is_documented():
    assert all(isinstance(v, str) and v for v in REASONS.values())
    assert {"unreadable", "silent_audio", "blank_image", "near_duplicate", "misaligned"} <= REASONS.keys()
