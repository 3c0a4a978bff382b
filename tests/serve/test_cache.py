import numpy as np
import pytest

from mmfusion.serve.cache import FeatureCache, content_key


def test_key_depends_on_model_modality_and_content():
    k = content_key("m1", "text", "a red circle")
    assert k == content_key("m1", "text", b"a red circle")  # str and its UTF-8 bytes are the same content
    assert k != content_key("m2", "text", "a red circle")
    assert k != content_key("m1", "image", "a red circle")
    assert k != content_key("m1", "text", "a red circle ")
    assert content_key("ab", "c", b"") != content_key("a", "bc", b"")  # parts are length-prefixed


def test_hit_returns_the_identical_vector_and_counts():
    cache = FeatureCache(4)
    assert cache.get("k") is None
    cache.put("k", [0.5, -1.0])
    a, b = cache.get("k"), cache.get("k")
    assert a is b and np.array_equal(a, [0.5, -1.0]) and a.dtype == np.float32
    with pytest.raises(ValueError):
        a[0] = 3.0  # stored read-only: a caller cannot change what the next hit returns
    assert (cache.hits, cache.misses) == (2, 1)
    assert cache.hit_rate == pytest.approx(2 / 3)


def test_lru_eviction_keeps_recently_used_entries():
    cache = FeatureCache(2)
    cache.put("a", [1.0])
    cache.put("b", [2.0])
    cache.get("a")  # a is now the most recent
    cache.put("c", [3.0])
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.evictions == 1
    off = FeatureCache(0)
    off.put("a", [1.0])
    assert off.get("a") is None and len(off) == 0
