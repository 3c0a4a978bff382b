"""Stage (a) of `mmfusion data build`: modality detection from file content (magic bytes), not the extension.

The extension only says what a file *claims* to be; the bytes decide what it is. When the two disagree the
file is *mislabelled*: the build reports it (manifest `notes`, report.html) and still uses the content as
what it really is — a valid WAV named `beep.png` is audio — because dropping valid data for a wrong name
would lose it, and treating it as an image would fail to decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...modalities import MODALITIES

TEXT_EXTS = ("txt", "caption", "text")
# container formats we recognise but cannot decode without a video library (PyAV / ffmpeg)
UNSUPPORTED_VIDEO_EXTS = ("mp4", "mov", "webm", "mkv", "avi")

# (format, modality, test on the first bytes)
_MAGIC: tuple[tuple[str, str, object], ...] = (
    ("png", "image", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    ("jpeg", "image", lambda b: b.startswith(b"\xff\xd8\xff")),
    ("gif", "image", lambda b: b[:6] in (b"GIF87a", b"GIF89a")),
    ("webp", "image", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"),
    ("bmp", "image", lambda b: b.startswith(b"BM") and len(b) > 14),
    ("tiff", "image", lambda b: b[:4] in (b"II*\x00", b"MM\x00*")),
    ("wav", "audio", lambda b: b[:4] in (b"RIFF", b"RIFX", b"RF64") and b[8:12] == b"WAVE"),
    ("flac", "audio", lambda b: b.startswith(b"fLaC")),
    ("ogg", "audio", lambda b: b.startswith(b"OggS")),
    ("npy", "video", lambda b: b.startswith(b"\x93NUMPY")),
    ("mp4", "unsupported", lambda b: b[4:8] == b"ftyp"),
    ("webm", "unsupported", lambda b: b.startswith(b"\x1a\x45\xdf\xa3")),
)
_EXT_FORMAT = {"jpg": "jpeg", "jpeg": "jpeg", "tif": "tiff", "mkv": "webm"}


def declared_modality(name: str) -> str | None:
    """The modality a file name's extension claims ("image", "audio", "video", "text"), or None."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in MODALITIES["image"].extensions or ext in ("gif", "bmp", "tif", "tiff"):
        return "image"
    if ext in MODALITIES["audio"].extensions:
        return "audio"
    if ext in MODALITIES["video"].extensions:
        return "video"
    if ext in TEXT_EXTS:
        return "text"
    if ext in UNSUPPORTED_VIDEO_EXTS:
        return "unsupported"
    return None


@dataclass(frozen=True)
class Detection:
    """What a file is: its modality ("image" | "audio" | "video" | "text" | "unsupported" | None when
    unknown), the format found in its bytes, what its name declared, and whether the two disagree."""

    modality: str | None
    format: str | None
    declared: str | None
    mislabelled: bool

    def note(self, name: str) -> str | None:
        """A one-line report of the mislabelling, or None."""
        if not self.mislabelled:
            return None
        return f"{name}: mislabelled: name says {self.declared}, content is {self.modality} ({self.format})"


def detect(data: bytes, name: str) -> Detection:
    """Modality of a file from its first bytes; `name` only supplies the declared modality to compare with.

    Bytes without a known signature count as text when they hold no NUL byte (a caption in any encoding;
    stage (b) decides whether it is valid UTF-8), else as unknown (None).
    """
    head = data[:16]
    declared = declared_modality(name)
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    for fmt, modality, test in _MAGIC:
        if test(head):  # type: ignore[operator]
            wrong_format = declared == modality and _EXT_FORMAT.get(ext, ext) != fmt
            return Detection(
                modality, fmt, declared, (declared is not None and declared != modality) or wrong_format
            )
    if not data:  # an empty file is what its name says; stage (b) reports it as empty / unreadable
        return Detection(declared, None, declared, False)
    if b"\x00" not in data[:4096]:
        return Detection("text", "text", declared, declared not in (None, "text"))
    return Detection(None, None, declared, False)


__all__ = ["Detection", "TEXT_EXTS", "declared_modality", "detect"]
