"""Stage (e) of `mmfusion data build`: exact and near-duplicate detection.

- exact: a sample's content hash (SHA-256 over its members' hashes, see `sample_hash`) equals an earlier one.
- near: the image's 256-bit DCT perceptual hash (imagehash.phash with hash_size=16, Zauner 2010) is within
  `max_distance` bits (Hamming) of an earlier kept image's, or — when a model is given — the image
  embeddings' cosine is at least `min_cosine`. 256 rather than the common 64 bits: on the synthetic world's
  plain scenes 0.07% of *distinct* image pairs fell within 6 of 64 bits, and since every image is compared
  with every other, that rejected 23% of a 1,000-sample build; with 256 bits no distinct pair of 80k came
  closer than 36 bits (see docs/data.md). pHash is colour-blind, so a match must also agree within
  `colour_tolerance` on a 4x4 colour signature (a red and a white triangle are not duplicates). Captions do not enter the near-duplicate test: the same picture with two captions is
  one picture (as in LAION / DataComp de-duplication).

"Earlier" is input order, so the first occurrence is kept and the result does not depend on the number
of workers. The comparison is against every kept image (vectorised XOR + popcount): O(n·kept), fine for
a million hashes on one machine; a larger corpus would bucket by hash bands first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image


def sha256(data: bytes) -> str:
    """Hex SHA-256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sample_hash(member_hashes: dict[str, str]) -> str:
    """Content hash of a sample from its per-modality hashes ({"image": sha, "text": sha, ...})."""
    return sha256("\n".join(f"{k}:{v}" for k, v in sorted(member_hashes.items())).encode())


PHASH_SIZE = 16  # pHash side: 16 x 16 = 256 bits


def perceptual_hash(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 image -> 64 hex digits: imagehash's 256-bit pHash (the 16x16 low frequencies of the DCT
    of a 64x64 grey thumbnail, thresholded at their median)."""
    return str(imagehash.phash(Image.fromarray(pixels), hash_size=PHASH_SIZE))


COLOUR_GRID = 4  # the colour signature: mean RGB of a 4 x 4 grid of cells


def colour_signature(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 image -> 96 hex digits: the mean colour of each cell of a 4x4 grid (box-filtered).

    pHash sees only grey levels, so a white and a red triangle at the same place hash alike; near-duplicates
    must also agree on this signature."""
    thumb = Image.fromarray(pixels).resize((COLOUR_GRID, COLOUR_GRID), Image.Resampling.BOX)
    return np.asarray(thumb, dtype=np.uint8).tobytes().hex()


def _bits(hexhash: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hexhash), dtype=np.uint8)


@dataclass(frozen=True)
class DedupItem:
    """One candidate sample as de-duplication sees it: id, content hash, and for an image its pHash, colour
    signature and (with a model) embedding."""

    id: str
    content: str
    phash: str | None = None
    colour: str | None = None
    embedding: Sequence[float] | None = None


def find_duplicates(
    items: Sequence[DedupItem],
    max_distance: int,
    min_cosine: float | None = None,
    colour_tolerance: int = 255,
    on_item: Callable[[int], object] | None = None,
) -> dict[int, tuple[str, str]]:
    """Index -> (reason "duplicate" | "near_duplicate", detail naming the kept sample) for every item that
    repeats an earlier kept one; items not in the result are kept.

    A pHash match counts only when every cell of the colour signatures differs by at most colour_tolerance
    (0..255; 255 = pHash alone). on_item(1) is called after each item (a progress bar's update)."""
    out: dict[int, tuple[str, str]] = {}
    seen: dict[str, str] = {}
    kept_hash: np.ndarray | None = None  # (len(items), hash bytes) uint8, filled up to len(kept_ids)
    kept_colour: np.ndarray | None = None  # (len(items), 48) int16 colour signatures, aligned with kept_hash
    kept_ids: list[str] = []  # ids of kept items with a pHash, aligned with kept_hash
    kept_emb: list[np.ndarray] = []
    emb_ids: list[str] = []  # ids of kept items with an embedding, aligned with kept_emb
    for i, it in enumerate(items):
        if on_item is not None:
            on_item(1)
        if it.content in seen:
            out[i] = ("duplicate", f"same content as {seen[it.content]}")
            continue
        seen[it.content] = it.id
        if it.phash is None:
            continue
        n = len(kept_ids)
        h = _bits(it.phash)
        c = _bits(it.colour or "00" * 3 * COLOUR_GRID**2).astype(np.int16)
        if kept_hash is None or kept_colour is None:
            kept_hash = np.zeros((len(items), h.size), dtype=np.uint8)
            kept_colour = np.zeros((len(items), c.size), dtype=np.int16)
        if n:
            dist = np.bitwise_count(kept_hash[:n] ^ h).sum(axis=1, dtype=np.int64)
            if it.colour is not None:
                dist[np.abs(kept_colour[:n] - c).max(axis=1) > colour_tolerance] = h.size * 8 + 1
            j = int(dist.argmin())
            if dist[j] <= max_distance:
                out[i] = ("near_duplicate", f"pHash within {int(dist[j])} bits of {kept_ids[j]}")
                continue
        if min_cosine is not None and it.embedding is not None and kept_emb:
            cos = np.stack(kept_emb) @ np.asarray(it.embedding, dtype=np.float32)
            j = int(cos.argmax())
            if cos[j] >= min_cosine:
                out[i] = ("near_duplicate", f"embedding cosine {cos[j]:.3f} with {emb_ids[j]}")
                continue
        kept_hash[n], kept_colour[n] = h, c
        kept_ids.append(it.id)
        if it.embedding is not None:
            kept_emb.append(np.asarray(it.embedding, dtype=np.float32))
            emb_ids.append(it.id)
    return out


__all__ = ["DedupItem", "colour_signature", "find_duplicates", "perceptual_hash", "sample_hash", "sha256"]
