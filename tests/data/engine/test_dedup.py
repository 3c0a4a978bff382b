"""De-duplication: exact hashes, pHash distance and embedding cosine, first occurrence kept."""

import numpy as np
from PIL import Image

from mmfusion.data.engine.dedup import (
    DedupItem,
    colour_signature,
    find_duplicates,
    perceptual_hash,
    sample_hash,
    sha256,
)


def test_sample_hash_is_order_free_and_content_sensitive():
    a = sample_hash({"image": "1", "text": "2"})
    assert a == sample_hash({"text": "2", "image": "1"})
    assert a != sample_hash({"image": "1", "text": "3"})
    assert sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_find_duplicates_exact_near_and_kept():
    items = [  # 64-bit hashes keep the example short; any length works
        DedupItem("a", "h1", "ffff000000000000"),
        DedupItem("b", "h1", "ffff000000000000"),  # exact copy of a
        DedupItem("c", "h2", "ffff00000000000f"),  # 4 bits from a: near
        DedupItem("d", "h3", "ffff0000000000ff"),  # 8 bits from a: kept
        DedupItem("e", "h4", None),  # no image: only exact matching applies
        DedupItem("f", "h4", None),
    ]
    assert find_duplicates(items, max_distance=4) == {
        1: ("duplicate", "same content as a"),
        2: ("near_duplicate", "pHash within 4 bits of a"),
        5: ("duplicate", "same content as e"),
    }
    assert 2 not in find_duplicates(items, max_distance=3)


def test_embedding_cosine_finds_near_duplicates_phash_misses():
    items = [
        DedupItem("a", "h1", "0000000000000000", embedding=[1.0, 0.0]),
        DedupItem("b", "h2", "ffffffffffffffff", embedding=[0.99, 0.141]),  # cosine 0.99 with a
        DedupItem("c", "h3", "00000000ffffffff", embedding=[0.0, 1.0]),
    ]
    assert find_duplicates(items, 4) == {}
    assert find_duplicates(items, 4, min_cosine=0.98) == {
        1: ("near_duplicate", "embedding cosine 0.990 with a")
    }


def test_perceptual_hash_survives_resizing_but_not_new_content():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    a = np.asarray(small.resize((64, 64), Image.Resampling.BICUBIC))
    b = np.asarray(small.resize((48, 48), Image.Resampling.BICUBIC))
    other = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((64, 64)))
    ha, hb, ho = (int(perceptual_hash(x), 16) for x in (a, b, other))
    assert len(perceptual_hash(a)) == 64  # 256 bits
    assert (ha ^ hb).bit_count() <= 32 < (ha ^ ho).bit_count()  # the default phash_distance is 32


def test_colour_signature_separates_what_phash_confuses():
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:2, :2] = (255, 255, 255)  # the top-left cell of the 4x4 grid is white
    red = img.copy()
    red[:2, :2] = (255, 0, 0)
    sig = colour_signature(img)
    assert sig == "ffffff" + "000000" * 15
    assert colour_signature(red) == "ff0000" + "000000" * 15
    same_phash = "ab" * 32
    items = [
        DedupItem("white", "h1", same_phash, sig),
        DedupItem("red", "h2", same_phash, colour_signature(red)),
        DedupItem("white-again", "h3", same_phash, "f0f0f0" + "000000" * 15),  # within 15 per cell
    ]
    ticks = []
    assert find_duplicates(items, 32, colour_tolerance=24, on_item=ticks.append) == {
        2: ("near_duplicate", "pHash within 0 bits of white")
    }
    assert ticks == [1, 1, 1]
    assert set(find_duplicates(items, 32)) == {1, 2}  # pHash alone: the red one too
