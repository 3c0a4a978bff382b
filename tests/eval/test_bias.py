"""Bias report (mmfusion.eval.bias, Z3): per-group metrics, disparity ratios and the four-fifths line, exact on
hand-made predictions; the HTML report."""

import json

import pytest

from mmfusion.eval.bias import FOUR_FIFTHS, axis_report, write_report

#            group a: all right            group b: two of four right
Y_TRUE = [1, 1, 0, 0, 1, 1, 0, 0]
Y_PRED = [1, 1, 0, 0, 1, 0, 1, 0]
GROUPS = ["a", "a", "a", "a", "b", "b", "b", "b"]


def test_per_group_metrics_and_ratios_by_hand():
    r = axis_report("g", Y_TRUE, Y_PRED, GROUPS, positive=1)
    assert r.counts == {"a": 4, "b": 4}
    assert r.by_group["accuracy"] == {"a": 1.0, "b": 0.5}
    assert r.by_group["selection_rate"] == {"a": 0.5, "b": 0.5}  # both predict 1 for two of four
    assert r.by_group["true_positive_rate"] == {"a": 1.0, "b": 0.5}
    assert r.by_group["false_positive_rate"] == {"a": 0.0, "b": 0.5}
    assert r.overall["accuracy"] == 0.75
    assert r.ratio["accuracy"] == 0.5 and r.difference["accuracy"] == 0.5
    assert r.ratio["selection_rate"] == 1.0
    assert r.ratio["false_positive_rate"] == 0.0
    assert r.flagged == ["accuracy", "true_positive_rate", "false_positive_rate"]


def test_four_fifths_boundary_and_missing_groups():
    # group a 5/5 right, group b 4/5 right: ratio exactly 0.8 is on the line, not under it
    y = [0] * 10
    pred = [0] * 5 + [0, 0, 0, 0, 1]
    r = axis_report("g", y, pred, ["a"] * 5 + ["b"] * 5)
    assert r.ratio["accuracy"] == pytest.approx(FOUR_FIFTHS) and r.flagged == []
    assert list(r.by_group) == ["accuracy"]  # no positive class: accuracy only
    r = axis_report("g", [0, 1, 2], [0, 1, 0], ["x", None, None])
    assert r.counts == {"(missing)": 2, "x": 1} and r.by_group["accuracy"]["(missing)"] == 0.5
    with pytest.raises(ValueError, match="3 labels, 2 predictions, 3 groups"):
        axis_report("g", [0, 1, 2], [0, 1], ["x", "y", "z"])


def test_html_and_json_report(tmp_path):
    reports = [axis_report("site", Y_TRUE, Y_PRED, GROUPS, positive=1)]
    path = write_report(reports, tmp_path / "bias", "bias report: demo", {"split": "test"})
    page = path.read_text()
    assert "<h2>axis: site</h2>" in page and "data:image/png;base64," in page
    assert "under the four-fifths line: accuracy, true_positive_rate, false_positive_rate" in page
    data = json.loads((tmp_path / "bias" / "bias.json").read_text())
    assert data["split"] == "test" and data["four_fifths"] == 0.8
    assert data["axes"][0]["by_group"]["accuracy"] == {"a": 1.0, "b": 0.5}


def test_mmfusion_bias_on_a_users_jsonl_column(tmp_path, capsys):
    """`mmfusion bias RUN --axes site`: groups from a JSONL column; the groups' counts are the manifest's and
    the overall accuracy is `mmfusion eval`'s."""
    import yaml

    from mmfusion.cli import main
    from mmfusion.config import load_config
    from mmfusion.evaluate import evaluate_fusion
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.run import train

    data = tmp_path / "d"
    for split, n in (("train", 96), ("test", 60)):
        assert (
            main(
                [
                    "data",
                    "synth",
                    "--task",
                    "paired_colour",
                    "--out",
                    str(data),
                    "--n",
                    str(n),
                    "--split",
                    split,
                ]
            )
            == 0
        )
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    for i, r in enumerate(rows):
        r["site"] = "south" if i % 3 == 0 else "north"
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "b",
        "out_dir": str(tmp_path / "runs"),
        "data": {"source": "jsonl", "train": str(data / "train.jsonl"), "test": str(data / "test.jsonl")},
        "model": {
            "kind": "fusion",
            "encoders": {"audio": "tiny", "image": "tiny"},
            "dim": 16,
            "fusion": "late",
        },
        "train": {"steps": 4, "batch_size": 16, "warmup_steps": 0, "progress": False, "checkpoint_every": 4},
    }
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe))
    cfg = load_config(tmp_path / "b.yaml")
    run = tmp_path / "runs" / "b"
    train(cfg, log=lambda _m: None)
    capsys.readouterr()
    assert main(["bias", str(run), "--axes", "site", "--positive", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("site: accuracy north=") and "report: " in out
    report = json.loads((run / "bias" / "bias.json").read_text())
    axis = report["axes"][0]
    assert axis["counts"] == {"north": 40, "south": 20} and report["positive"] == 3
    assert set(axis["by_group"]) == {
        "accuracy",
        "selection_rate",
        "true_positive_rate",
        "false_positive_rate",
    }
    model = MultiModalModel.from_pretrained(run / "model")
    expected = evaluate_fusion(load_config(run / "config.yaml"), model)["accuracy_all"]
    assert axis["overall"]["accuracy"] == pytest.approx(expected)
    assert main(["bias", str(run), "--axes", "nowhere"]) == 1
    assert "--axes 'nowhere': no sample of the test split has that field" in capsys.readouterr().err
    assert main(["bias", str(run), "--axes", "site", "--positive", "purple"]) == 2
    assert "--positive 'purple': not a class of this model (0..7)" in capsys.readouterr().err
