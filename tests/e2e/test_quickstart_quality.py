"""The demo's acceptance figures (issue: foundation, part 8), on the real recipe: configs/quickstart.yaml,
800 steps of 128 (about 3 minutes on 2 cores)."""

import json
from pathlib import Path

import pytest

from clirun import run_mmfusion

RECIPE = Path(__file__).parents[2] / "configs" / "quickstart.yaml"


@pytest.mark.timeout(900)
def test_quickstart_reaches_its_targets(tmp_path):
    run_mmfusion("train", "--config", RECIPE, "--set", "train.progress=false", cwd=tmp_path, timeout=850)
    m = json.loads((tmp_path / "runs" / "quickstart" / "metrics.json").read_text())
    assert m["n_pairs"] == 1000
    assert m["zero_shot_colour_acc"] >= 0.95, m
    assert m["zero_shot_shape_acc"] >= 0.90, m
    assert m["t2i_recall@5"] >= 0.80, m
