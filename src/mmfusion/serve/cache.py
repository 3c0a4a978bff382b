"""Feature cache for the server: an LRU of embeddings keyed by a content hash, bounded by entry count.

The key is sha256(model id, modality, raw request bytes or UTF-8 text), so a cache hit means "this model
already encoded exactly these bytes": the stored array is returned as is (read-only), hence identical.
Thread-safe (a lock around the OrderedDict); counters for hits, misses and evictions feed /metrics.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def content_key(model_id: str, modality: str, payload: bytes | str) -> str:
    """sha256 hex digest of (model id, modality, payload); each part length-prefixed so none can run into
    the next (("ab", "c") and ("a", "bc") hash differently)."""
    data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
    h = hashlib.sha256()
    for part in (model_id.encode("utf-8"), modality.encode("utf-8"), data):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


class FeatureCache:
    """LRU map key -> read-only float32 vector, at most `max_entries` entries (0 disables storing)."""

    def __init__(self, max_entries: int = 4096):
        if max_entries < 0:
            raise ValueError(f"max_entries = {max_entries}: expected >= 0")
        self.max_entries = max_entries
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> np.ndarray | None:
        """The stored vector (and count a hit, mark it most recent), or None (and count a miss)."""
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: Any) -> None:
        """Store a copy of `value` as a read-only float32 array; evict least-recently-used beyond the bound."""
        if self.max_entries == 0:
            return
        arr = np.array(value, dtype=np.float32, copy=True)
        arr.flags.writeable = False
        with self._lock:
            self._data[key] = arr
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict[str, float | int]:
        return {
            "entries": len(self._data),
            "max_entries": self.max_entries,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "hit_rate": self.hit_rate,
        }


__all__ = ["FeatureCache", "content_key"]
