"""Issue 15: `train.stages[i].data` is a whole data section: a stage trains on its own source."""

import json

from mmfusion.config import config_from_dict
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_jsonl
from mmfusion.run import train


def test_a_stage_trains_on_its_own_data(tmp_path):
    world = SyntheticWorld(WorldConfig(seed=5, image_size=16))
    manifest = write_jsonl(make_split(world, "train", 32, ("image", "text")), tmp_path / "own", name="train")
    tiny = {
        "embed_dim": 16,
        "text": {"vocab_size": 120, "context_length": 24, "width": 16, "depth": 1, "heads": 2},
        "image": {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
    }
    cfg = config_from_dict(
        {
            "name": "staged",
            "out_dir": str(tmp_path / "runs"),
            "data": {
                "source": "synthetic",
                "synthetic": {"n_train": 128, "n_val": 8, "n_test": 8, "image_size": 16},
            },
            "model": tiny,
            "train": {
                "batch_size": 16,
                "warmup_steps": 1,
                "precision": "fp32",
                "device": "cpu",
                "threads": 1,
                "progress": False,
                "log_every": 1,
                "checkpoint_every": 100,
                "stages": [
                    {"name": "own", "steps": 5, "data": {"source": "jsonl", "train": str(manifest)}},
                    {"name": "run", "steps": 5},
                ],
            },
        }
    )
    train(cfg, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "staged" / "metrics.jsonl").read_text().splitlines()]
    epochs = {n: [r["epoch"] for r in rows if r.get("stage") == n and "loss" in r] for n in ("own", "run")}
    assert epochs["own"] == [0, 0, 1, 1, 2], epochs
    assert epochs["run"] == [0, 0, 0, 0, 0], epochs
