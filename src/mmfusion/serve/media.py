"""Uploaded media -> the raw values of the modality decoders, under the server's own limits, with HTTP errors.

The decoding is the modalities' own (`mmfusion.modalities.image.decode_image`, `...audio.decode_audio`,
`...video.decode_video`: the decoders the data sources use). This module adds the limits of a public server and
turns the decoders' `MediaError` into HTTP answers:
- 400 undecodable: the bytes are not a file of that kind (the decoder's parser failed; a decoder raises its
  MediaError *from* the parser's exception),
- 422 invalid: the file decodes but its content is refused (a MediaError of the decoder's own: an empty or
  non-finite clip, an array that is not (T, H, W, 3) uint8), or it is over a limit here: an image of more
  than MAX_IMAGE_PIXELS pixels (read from its header, before the pixels are decoded), a video of more than
  MAX_VIDEO_FRAMES frames or frames of more than MAX_IMAGE_PIXELS pixels.
"""

from __future__ import annotations

import io

import numpy as np

from ..modalities.audio import decode_audio
from ..modalities.base import MediaError
from ..modalities.image import decode_image
from ..modalities.video import decode_video
from .http import APIError, invalid, undecodable

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_VIDEO_FRAMES = 512


def refused(e: MediaError, what: str, undecodable_message: str) -> APIError:
    """A decoder's MediaError -> 400 `undecodable_message` when its parser failed (the error has a cause),
    else 422 naming `what` and the decoder's problem."""
    if e.__cause__ is not None:
        return undecodable(undecodable_message)
    return invalid(f"{what}: {e.problem}")


def _cause(e: MediaError) -> str:
    return type(e.__cause__ or e).__name__


def read_image(data: bytes, what: str) -> np.ndarray:
    """Image file bytes -> (H, W, 3) uint8 (decode_image); 400 when they are not an image, 422 when it has
    more than MAX_IMAGE_PIXELS pixels (checked from the header, before the pixels are decoded)."""
    from PIL import Image

    def not_an_image(kind: str) -> APIError:
        return undecodable(f"{what} is not a decodable image ({kind}); send PNG or JPEG")

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise invalid(f"{what}: {e}") from None
    except Exception as e:  # PIL raises many types for broken files
        raise not_an_image(type(e).__name__) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise invalid(f"{what} is {width}x{height}; at most {MAX_IMAGE_PIXELS} pixels")
    try:
        return decode_image(data)
    except MediaError as e:  # the header read, the pixels do not
        raise not_an_image(_cause(e)) from None


def read_audio(data: bytes, what: str) -> tuple[np.ndarray, int]:
    """Audio file bytes (WAV, FLAC, OGG) -> (float32 mono wave, sample rate) (decode_audio); 400 when they do
    not decode, 422 when the clip is empty or not finite."""
    try:
        return decode_audio(data)
    except MediaError as e:
        raise refused(e, what, f"{what} is not a decodable WAV file ({_cause(e)})") from None


def read_video(data: bytes, what: str) -> np.ndarray:
    """.npy bytes -> (T, H, W, 3) uint8 (decode_video, never unpickled); 400 when they are not a .npy
    array, 422 for another shape or dtype, or more than MAX_VIDEO_FRAMES frames of at most MAX_IMAGE_PIXELS."""
    try:
        arr = decode_video(data)
    except MediaError as e:
        raise refused(e, what, f"{what} is not a decodable .npy array ({_cause(e)})") from None
    t, h, w, _ = arr.shape
    if not (1 <= t <= MAX_VIDEO_FRAMES) or h < 1 or w < 1 or h * w > MAX_IMAGE_PIXELS:
        raise invalid(f"{what} has shape {arr.shape}; need 1..{MAX_VIDEO_FRAMES} frames of a sane size")
    return arr


READERS = {"image": read_image, "audio": read_audio, "video": read_video}

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_FRAMES",
    "READERS",
    "read_audio",
    "read_image",
    "read_video",
    "refused",
]
