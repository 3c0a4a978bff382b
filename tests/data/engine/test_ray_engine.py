"""`--engine ray` on a local one-CPU Ray instance gives the same output as the local engine."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmfusion.data.engine.build_config import BuildConfig
from mmfusion.data.engine.pipeline import build


def _tree(root: Path) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40, 40))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (root / f"s{i}.png").write_bytes(buf.getvalue())
        (root / f"s{i}.txt").write_text(f"picture number {i}")
    (root / "s2.txt").write_text("   ")  # empty caption: rejected
    return root


# a hang bound, not a speed check: < 17 s on idle cores, 186 s with both cores busy (Ray starts its GCS,
# raylet and a worker process, each slowed by the load)
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside Ray Data
def test_ray_engine_matches_local_engine(tmp_path):
    import ray

    src = _tree(tmp_path / "src")
    cfg = BuildConfig(image_size=16, min_image_side=8, shard_size=1)
    local = build(src, tmp_path / "local", cfg, workers=1, chunk_size=2)
    on_ray = build(src, tmp_path / "ray", cfg, workers=1, chunk_size=2, engine="ray")
    assert not ray.is_initialized()  # the local instance it started is shut down
    assert (on_ray.build_id, on_ray.accepted, on_ray.chunks_processed) == (local.build_id, 2, 2)
    for name in ("manifest.json", "rejected.jsonl", "shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
