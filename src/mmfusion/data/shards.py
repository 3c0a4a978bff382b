"""WebDataset shards on disk: expanding shard patterns, reading a shard's raw samples, spotting a truncated
tar, counting samples from tar headers, and a seeded shuffle buffer (used by mmfusion.data.sources and the
data engine)."""

from __future__ import annotations

import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..errors import DataError


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def shard_list(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a brace pattern ("train-{000000..000003}.tar"), a tar, a folder of tars or a list of them.

    Local shards must exist (DataError naming the missing one); remote URLs ("s3://", "pipe:") pass unchecked.
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for item in map(str, items):
        if is_remote(item):
            out += expand_urls(item)
        elif Path(item).is_dir():
            tars = sorted(str(p) for p in Path(item).glob("*.tar"))
            if not tars:
                raise DataError(f"WebDataset folder {item} has no .tar shards")
            out += tars
        else:
            for url in expand_urls(item):
                if not Path(url).is_file():
                    raise DataError(
                        f"WebDataset shard {url} not found" + (f" (from {item})" if url != item else "")
                    )
                out.append(url)
    if not out:
        raise DataError("no WebDataset shards given")
    return out


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def shard_samples(url: str, select_files=None) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", ext: bytes}) of one shard, grouped by webdataset's tar iterators;
    the file is closed when the generator ends."""
    stream = wds.gopen(url, "rb")
    try:
        yield from group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], select_files=select_files)
        )
    finally:
        stream.close()


def truncation(path: str) -> str | None:
    """Why a local .tar looks truncated (Python's tarfile silently stops at a cut header), or None."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - 1024, 0))
        tail = f.read()
    if size % 512 or len(tail) < 1024 or tail.strip(b"\0"):
        return f"truncated: {size} bytes and no end-of-archive blocks"
    return None


def count_shard(url: str, keep: Callable[[str, str], bool] | None = None) -> int:
    """Samples in one local shard (consecutive member keys, as webdataset groups them), from tar headers;
    with `keep`, only those keep(url, key) accepts."""
    total, prev = 0, None
    try:
        with tarfile.open(url, "r:*") as tf:
            for m in tf:
                key = base_plus_ext(m.name)[0] if m.isreg() and not m.name.startswith("__") else None
                if key is not None and key != prev:
                    total, prev = total + (keep is None or keep(url, key)), key
    except (OSError, tarfile.TarError) as e:
        warnings.warn(f"counting samples: cannot read all of {url}: {e}", stacklevel=3)
    return total


def count_samples(urls) -> int:
    """Number of samples in local shards (a brace pattern, tar, folder or list), from tar headers only.

    An unreadable shard is counted as far as it can be read, with a warning."""
    return sum(count_shard(url) for url in shard_list(urls))


__all__ = [
    "buffer_shuffle",
    "count_samples",
    "count_shard",
    "is_remote",
    "shard_list",
    "shard_samples",
    "truncation",
]
