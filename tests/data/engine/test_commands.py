"""`mmfusion data build|info|diff`: help, a build from the command line, info / diff output, errors."""

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from mmfusion.cli import EXIT_CONFIG, EXIT_ERROR, main


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((40, 40))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (root / f"p{i}.png").write_bytes(buf.getvalue())
        (root / f"p{i}.txt").write_text(f"a picture with {i + 1} white stripes")
    return root


@pytest.mark.parametrize("command", ["build", "info", "diff"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mmfusion data {command}")
    if command == "build":
        assert "--min-alignment MIN_ALIGNMENT" in out and "--engine {local,ray}" in out
        assert "near_duplicate" in out  # the reasons are listed


def test_build_info_diff(src, tmp_path, capsys):
    common = ["--workers", "1", "--image-size", "16", "--min-image-side", "8", "--shard-size", "2"]
    assert main(["data", "build", str(src), "--out", str(tmp_path / "a"), *common]) == 0
    summary = dict(re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()[:-1])
    assert summary["accepted"] == "3" and summary["rejected"] == "0"
    assert summary["shards written / skipped"] == "2 / 0"

    assert main(["data", "info", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "3 accepted in 2 shards, 0 rejected, 3 inputs" in out
    assert "  image+text                     3" in out

    (src / "p1.txt").write_text("a changed caption")
    (src / "p2.txt").unlink()
    (src / "p2.png").unlink()
    assert main(["data", "build", str(src), "--out", str(tmp_path / "b"), *common]) == 0
    capsys.readouterr()
    assert main(["data", "diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == "- p2\n~ p1\n0 added, 1 removed, 1 changed\n"


def test_errors_are_one_line(src, tmp_path, capsys):
    assert main(["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == EXIT_ERROR
    assert capsys.readouterr().err == f"mmfusion: DataError: source {tmp_path / 'nope'} not found\n"
    assert not (tmp_path / "o").exists()  # nothing written for a bad source
    assert main(["data", "build", str(src), "--out", str(tmp_path / "o"), "--blank-std", "-1"]) == EXIT_CONFIG
    assert capsys.readouterr().err == "mmfusion: config error: build config blank_std = -1.0: expected >= 0\n"
    assert main(["data", "build", str(src), "--out", str(tmp_path / "o"), "--workers", "0"]) == EXIT_CONFIG
    assert "--workers 0: expected a positive number" in capsys.readouterr().err
    assert main(["data", "info", str(src)]) == EXIT_ERROR
    assert "is not a built dataset" in capsys.readouterr().err


def test_build_with_a_model_gets_the_loader_from_the_cli(src, tmp_path, make_tiny_model, capsys):
    folder = make_tiny_model().save_pretrained(tmp_path / "m")
    out = tmp_path / "a"
    argv = ["data", "build", str(src), "--out", str(out), "--model", str(folder), "--workers", "1"]
    argv += ["--image-size", "16", "--min-image-side", "8", "--min-alignment", "-1", "--dedup-cosine", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["model"] == str(folder)
    assert len(manifest["samples"]) == 3 and all(-1 <= s["align_score"] <= 1 for s in manifest["samples"])
