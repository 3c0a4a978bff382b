"""Stage (d) of `mmfusion data build`: quality assessment of processed content, and the rejection reasons.

Each check returns a list of (reason, detail) pairs — empty when the content passes — so one sample can
be rejected for several reasons at once and rejected.jsonl lists them all.
"""

from __future__ import annotations

import numpy as np

# every reason a sample can be rejected for, in the order the report lists them
REASONS = {
    "bad_source": "the source entry itself is broken (invalid JSON line, missing media file, wrong field type)",
    "unreadable": "a file cannot be decoded (truncated, corrupt or empty)",
    "unknown_format": "a file whose bytes match no supported format",
    "unsupported_format": "a recognised format we cannot decode here (video containers need PyAV)",
    "non_utf8_text": "a caption file that is not valid UTF-8",
    "conflicting_files": "two files of the same modality share one sample name",
    "too_small": "an image smaller than min_image_side",
    "blank_image": "an image with (almost) no variation: pixel std under blank_std",
    "silent_audio": "audio whose peak is under silence_level",
    "too_short": "audio shorter than min_audio_seconds after trimming silence",
    "empty_caption": "a caption that is empty after cleaning",
    "caption_too_long": "a caption longer than max_caption_chars",
    "garbled_caption": "a caption with replacement characters or too few letters (min_letter_ratio)",
    "misaligned": "image-caption CLIP-style score under min_alignment (with --model)",
    "filtered": "blocked by a concept filter (--filter): the concept and its score in the detail",
    "duplicate_id": "a sample id seen earlier in the source",
    "duplicate": "exact duplicate (same content hash) of an earlier sample",
    "near_duplicate": "image near-duplicate of an earlier sample (perceptual hash or embedding cosine)",
}

Issue = tuple[str, str]


def image_issues(
    pixels: np.ndarray, original: tuple[int, int], min_side: int, blank_std: float
) -> list[Issue]:
    """Checks on a processed (H, W, 3) uint8 image and its original (width, height)."""
    out: list[Issue] = []
    if min(original) < min_side:
        out.append(("too_small", f"image is {original[0]}x{original[1]}, smaller than {min_side} px"))
    std = float(pixels.astype(np.float32).std())
    if std < blank_std:
        out.append(("blank_image", f"pixel std {std:.2f} < {blank_std}"))
    return out


def audio_issues(
    wave: np.ndarray, sample_rate: int, peak: float, silence_level: float, min_seconds: float
) -> list[Issue]:
    """Checks on a processed mono wave (after trimming) and the original clip's peak amplitude."""
    if peak < silence_level:
        return [("silent_audio", f"peak amplitude {peak:.2e} < {silence_level:.0e}")]
    seconds = wave.shape[0] / sample_rate
    if seconds < min_seconds:
        return [("too_short", f"{seconds:.3f} s of sound after trimming, less than {min_seconds} s")]
    return []


def text_issues(text: str, max_chars: int, min_letter_ratio: float) -> list[Issue]:
    """Checks on a cleaned caption: empty, too long, garbled (U+FFFD or too few letters among non-spaces)."""
    if not text:
        return [("empty_caption", "caption is empty after cleaning")]
    out: list[Issue] = []
    if len(text) > max_chars:
        out.append(("caption_too_long", f"{len(text)} characters > {max_chars}"))
    chars = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in chars) / len(chars)
    if "\ufffd" in text or letters < min_letter_ratio:
        out.append(("garbled_caption", f"letter ratio {letters:.2f} < {min_letter_ratio} or U+FFFD present"))
    return out


__all__ = ["REASONS", "audio_issues", "image_issues", "text_issues"]
