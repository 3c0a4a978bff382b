"""Provenance of generated media (Z4): a signed manifest per file.

The manifest records the file's SHA-256 and size with the model id, seed and prompt that made it, and is signed
with HMAC-SHA256 over its canonical JSON (sorted keys, no spaces). `verify_manifest` recomputes both: a changed
byte in the file fails the hash, a changed field of the manifest (or a different key) fails the signature.

HMAC is a shared-secret signature: whoever can verify can also sign, so it proves origin only among the holders
of the key (the operator's own records), not to third parties (that needs a public-key signature). The key
comes from a key file or the environment variable MMFUSION_PROVENANCE_KEY, never from the command line. (Not
to confuse with mmfusion.models.provenance: where a model's weights came from.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

KEY_ENV = "MMFUSION_PROVENANCE_KEY"
FORMAT = "mmfusion-provenance/1"
ALG = "HMAC-SHA256"


def load_key(key_file: str | Path | None = None) -> bytes:
    """The signing key: the bytes of `key_file` (surrounding whitespace stripped), else $MMFUSION_PROVENANCE_KEY."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as e:
            raise ConfigError(f"--key-file {key_file}: cannot read ({e.strerror or e})") from None
        if not key:
            raise ConfigError(f"--key-file {key_file} is empty")
        return key
    env = os.environ.get(KEY_ENV, "").strip()
    if not env:
        raise ConfigError(f"no provenance key: pass --key-file FILE or set {KEY_ENV}")
    return env.encode()


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def make_manifest(
    data: bytes, model_id: str, seed: int | None, prompt: str | None, **extra: Any
) -> dict[str, Any]:
    """The unsigned manifest of `data`: format, sha256, bytes, model_id, seed, prompt and any `extra` fields."""
    return {
        "format": FORMAT,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "model_id": model_id,
        "seed": seed,
        "prompt": prompt,
        **extra,
    }


def sign_manifest(manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
    """A copy of `manifest` with "signature": {"alg": "HMAC-SHA256", "value": hex digest}."""
    digest = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
    return {**manifest, "signature": {"alg": ALG, "value": digest}}


@dataclass
class Verification:
    """ok when the signature and (when the file was given) its hash both match; `problems` says what did not."""

    ok: bool
    problems: list[str] = field(default_factory=list)


def verify_manifest(manifest: dict[str, Any], key: bytes, data: bytes | None = None) -> Verification:
    """Check the manifest's signature with `key` and, with `data`, the file's SHA-256 and size against it."""
    problems = []
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != ALG or not isinstance(sig.get("value"), str):
        problems.append(f"no {ALG} signature in the manifest")
    else:
        expected = hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig["value"]):
            problems.append("signature mismatch: the manifest was changed or signed with another key")
    if data is not None:
        if hashlib.sha256(data).hexdigest() != manifest.get("sha256") or len(data) != manifest.get("bytes"):
            problems.append("content mismatch: the file's SHA-256 is not the manifest's")
    return Verification(not problems, problems)


def manifest_path(media: str | Path) -> Path:
    """Where a file's manifest lives by default: next to it, `<name>.provenance.json`."""
    media = Path(media)
    return media.with_name(media.name + ".provenance.json")


def write_signed_manifest(
    media: str | Path, key: bytes, model_id: str, seed: int | None, prompt: str | None, **extra
):
    """Sign `media`'s manifest and write it to manifest_path(media); returns (path, manifest)."""
    manifest = sign_manifest(make_manifest(Path(media).read_bytes(), model_id, seed, prompt, **extra), key)
    path = manifest_path(media)
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    return path, manifest


def folder_id(folder: str | Path) -> str:
    """A model folder's id for manifests: SHA-256 over its files' relative paths and bytes (16 hex digits)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]
