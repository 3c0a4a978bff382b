"""`mmfusion scd calibrate`, `mmfusion filter calibrate`, `mmfusion provenance sign|verify` in process."""

import json

import numpy as np
import pytest
from PIL import Image

from mmfusion.cli import main
from mmfusion.safety import watermark
from mmfusion.safety.filters import ConceptFilters
from mmfusion.safety.provenance import KEY_ENV
from mmfusion.safety.scd import SCDCalibration, top1


@pytest.fixture(scope="module")
def saved(make_tiny_model, tmp_path_factory):
    from mmfusion.serve.engine import Engine
    from mmfusion.serve.index import build_synthetic_index

    model = make_tiny_model()
    root = tmp_path_factory.mktemp("cli")
    folder = model.save_pretrained(root / "model")
    build_synthetic_index(Engine(model), 12, root / "index", "test", 0, 16)
    return model, folder, root


def test_scd_calibrate_flags_the_stated_fraction_of_its_queries(saved, tmp_path, capsys):
    model, folder, root = saved
    texts = tmp_path / "q.txt"
    texts.write_text(
        "\n".join(
            f"a {s} {c} circle" for s in ("small", "large") for c in ("red", "blue", "green", "white", "cyan")
        )
    )
    out = tmp_path / "scd.json"
    rc = main([
        "scd", "calibrate", str(folder), "--index", str(root / "index"), "--texts", str(texts), "--fpr", "0.2",
        "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    cal = SCDCalibration.load(out)
    from mmfusion.serve.index import EmbeddingIndex

    d = (
        1
        - top1(
            model.encode_text(texts.read_text().splitlines()), EmbeddingIndex.load(root / "index").embeddings
        )[1]
    )
    assert cal.n_calibration == 10 and int((d > cal.threshold).sum()) == 2  # floor(0.2 * 10)
    assert "flags 0.200 of 10" in capsys.readouterr().out
    rc = main(["scd", "calibrate", str(folder), "--index", str(root / "index"), "--synthetic", "8", "--score",
               "mutation", "--mutations", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0 and SCDCalibration.load(out).score == "mutation"
    assert main(["scd", "calibrate", str(folder), "--index", str(root / "index"), "--synthetic", "8", "--fpr", "1.5",
                 "--out", str(out)]) == 2  # fmt: skip


def test_scd_calibrate_for_classify_on_synthetic_and_jsonl_inputs(saved, make_tiny_model, tmp_path, capsys):
    import torch

    from mmfusion import load_model
    from mmfusion.models.multimodal import MultiModalModel
    from mmfusion.serve.engine import Engine
    from mmfusion.serve.safety import classify_mutation_scores, classify_mutations

    torch.manual_seed(0)
    encoders = {"text": "tiny", "image": {"image_size": 16, "patch_size": 8}}
    fusion = MultiModalModel(
        encoders, head="classify", n_classes=4, dim=16, tokenizer=make_tiny_model().tokenizer
    )
    folder = fusion.eval().save_pretrained(tmp_path / "fusion")
    out = tmp_path / "scd.json"
    rc = main(["scd", "calibrate", str(folder), "--task", "classify", "--synthetic", "20", "--fpr", "0.2",
               "--mutations", "4", "--sigma", "0.2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    cal = SCDCalibration.load(out)
    engine = Engine(load_model(folder))
    assert (cal.task, cal.score, cal.n_calibration, cal.sigma) == ("classify", "mutation", 20, 0.2)
    assert cal.model_id == engine.model_id
    flagged = float(capsys.readouterr().out.split("flags ")[1].split()[0])
    assert flagged <= 0.2

    # --data: a JSONL manifest; the row without an image is left out and counted; scores match the definition
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "img" / f"{i}.png"
        )
        rows.append({"image": f"img/{i}.png", "text": "a small red circle", "label": i % 4})
    rows.append({"text": "no image here"})
    (tmp_path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["scd", "calibrate", str(folder), "--task", "classify", "--data", str(tmp_path / "clean.jsonl"),
               "--fpr", "0.0", "--mutations", "4", "--sigma", "0.2", "--out", str(out)])  # fmt: skip
    assert rc == 0 and "1 rows without an image left out" in capsys.readouterr().out
    cal = SCDCalibration.load(out)
    samples = [{"image": (tmp_path / r["image"]).read_bytes(), "text": r["text"]} for r in rows[:6]]
    prep = lambda ss: [{m: engine.prepare(m, v, "x") for m, v in s.items()} for s in ss]  # noqa: E731
    clean = engine.classify(prep(samples))
    muts, owners = classify_mutations(samples, cal)
    scores = classify_mutation_scores(clean, engine.classify(prep(muts)), owners)
    assert cal.n_calibration == 6 and cal.threshold == pytest.approx(
        max(scores)
    )  # fpr 0: nothing clean flagged

    # errors: one line, exit 2, naming the flag
    assert main(["scd", "calibrate", str(folder), "--task", "classify", "--index", "x", "--synthetic", "2",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "not --index" in capsys.readouterr().err
    assert (
        main(["scd", "calibrate", str(saved[1]), "--task", "classify", "--synthetic", "2", "--out", str(out)])
        == 2
    )
    assert "needs a fusion classifier with an image encoder" in capsys.readouterr().err
    assert main(["scd", "calibrate", str(saved[1]), "--synthetic", "2", "--out", str(out)]) == 2
    assert "--task search needs --index" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img/missing.png"}) + "\n")
    assert main(["scd", "calibrate", str(folder), "--task", "classify", "--data", str(tmp_path / "bad.jsonl"),
                 "--out", str(out)]) != 0  # fmt: skip
    assert "bad.jsonl line 1: 'image' file img/missing.png" in capsys.readouterr().err


def test_filter_calibrate_writes_thresholds_and_reports(saved, tmp_path, capsys):
    _, folder, _ = saved
    out = tmp_path / "f.json"
    rc = main(["filter", "calibrate", str(folder), "--concepts", "red,cross", "--n", "40", "--out", str(out)])
    assert rc == 0
    f = ConceptFilters.load(out)
    assert [c.name for c in f.concepts] == ["red", "cross"] and set(f.concepts[0].thresholds) == {
        "image",
        "text",
    }
    assert len(f.concepts[0].prompts) == 10  # 2 sizes x 5 shapes name "red"
    printed = capsys.readouterr().out
    assert "image red: normal P=" in printed and "text  cross: normal P=" in printed
    assert main(["filter", "calibrate", str(folder), "--concepts", "reed", "--out", str(out)]) == 2
    assert "the synthetic world's concepts are" in capsys.readouterr().err


def test_provenance_sign_verify_and_tamper(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "secret")
    rng = np.random.default_rng(0)
    img = tmp_path / "gen.png"
    # a dark picture with mild noise, like the synthetic world's (on white noise a 32 px mark is too weak)
    Image.fromarray((20 + rng.integers(0, 16, (32, 32, 3))).astype(np.uint8)).save(img)
    assert main(["provenance", "sign", str(img), "--model-id", "m1", "--seed", "3", "--prompt", "a red circle",
                 "--watermark"]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "gen.png.provenance.json").read_text())
    assert manifest["model_id"] == "m1" and manifest["seed"] == 3 and manifest["prompt"] == "a red circle"
    assert watermark.detect(np.asarray(Image.open(img)), b"secret")
    capsys.readouterr()
    assert main(["provenance", "verify", str(img)]) == 0
    assert "OK (model m1, seed 3); watermark z = " in capsys.readouterr().out
    data = bytearray(img.read_bytes())
    data[-20] ^= 1
    img.write_bytes(bytes(data))
    assert main(["provenance", "verify", str(img)]) == 1
    assert "FAILED: content mismatch" in capsys.readouterr().out
    monkeypatch.delenv(KEY_ENV)
    assert main(["provenance", "verify", str(img)]) == 2


def _labelled_manifest(root, n=24):
    """n scenes of the synthetic world as a user's JSONL: image PNG + caption + the concepts they show."""
    from mmfusion.data.synthetic import Scene, SyntheticWorld, WorldConfig
    from mmfusion.eval.concepts import shows

    world = SyntheticWorld(WorldConfig(seed=0))
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        s = world.sample("val", i)
        Image.fromarray(s["image"]).save(root / "img" / f"{i}.png")
        scene = Scene.from_dict(s["scene"])
        rows.append(
            {
                "image": f"img/{i}.png",
                "text": s["text"],
                "concepts": [c for c in ("red", "large") if shows(scene, c)],
            }
        )
    path = root / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_filter_calibrate_on_a_users_jsonl(saved, tmp_path, capsys):
    from mmfusion.eval.labelled_concepts import embed, read_labelled, split_rows
    from mmfusion.safety.filters import precision_recall

    model, folder, _ = saved
    data, rows = _labelled_manifest(tmp_path)
    out = tmp_path / "f.json"
    rc = main(
        [
            "filter",
            "calibrate",
            str(folder),
            "--data",
            str(data),
            "--eval-fraction",
            "0.25",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    f = ConceptFilters.load(out)
    assert [c.name for c in f.concepts] == ["large", "red"]  # every label in the file, sorted
    labelled = read_labelled(data)
    cal, ev = split_rows(labelled.labels, 0.25, 0)
    printed = capsys.readouterr().out
    assert f"held-out 0.25 of {data} ({len(ev)} rows; calibrated on {len(cal)})" in printed
    for m in ("image", "text"):
        for part, check in ((cal, "target"), (ev, "printed")):
            sub = labelled.subset(part)
            scores = f.scores(embed(model, sub, m))
            for j, c in enumerate(f.concepts):
                for level, target in f.recall.items():
                    pr = precision_recall(scores[:, j], sub.labels[:, j], c.thresholds[m][level])
                    if check == "target":  # the thresholds reach their recall on the rows they were set on
                        assert pr["recall"] >= target
                    else:  # the held-out figures printed are those of the saved filters
                        assert f"{level} P={pr['precision']:.3f} R={pr['recall']:.3f}" in printed
    # --eval-data: every row of the other file is held out
    rc = main(["filter", "calibrate", str(folder), "--data", str(data), "--eval-data", str(data), "--concepts",
               "red,large", "--out", str(out)])  # fmt: skip
    assert rc == 0 and f"{data}, {len(rows)} rows: precision / recall" in capsys.readouterr().out
    assert [c.name for c in ConceptFilters.load(out).concepts] == ["red", "large"]  # in the order given
    # the normal level calibrated for precision instead: on the calibration rows it reaches the target
    rc = main(
        ["filter", "calibrate", str(folder), "--data", str(data), "--precision", "0.6", "--out", str(out)]
    )
    assert rc == 0 and "targets (on the calibration samples): normal precision 0.6, strict recall 0.99" in (
        capsys.readouterr().out
    )
    f = ConceptFilters.load(out)
    assert f.precision == {"normal": 0.6}
    sub = labelled.subset(cal)
    for m in ("image", "text"):
        scores = f.scores(embed(model, sub, m))
        for j, c in enumerate(f.concepts):
            assert (
                precision_recall(scores[:, j], sub.labels[:, j], c.thresholds[m]["normal"])["precision"]
                >= 0.6
            )
    # errors: exit 2 for flag mixes, 1 naming file / line / field for the data
    assert main(["filter", "calibrate", str(folder), "--data", str(data), "--n", "5", "--out", str(out)]) == 2
    assert "--n chooses synthetic samples" in capsys.readouterr().err
    assert main(["filter", "calibrate", str(folder), "--concepts", "red", "--eval-data", str(data), "--out",
                 str(out)]) == 2  # fmt: skip
    assert "--eval-data goes with --data" in capsys.readouterr().err
    assert main(["filter", "calibrate", str(folder), "--data", str(data), "--label-column", "tags", "--out",
                 str(out)]) == 1  # fmt: skip
    assert f"{data} line 1: no field 'tags'" in capsys.readouterr().err
    assert (
        main(
            ["filter", "calibrate", str(folder), "--data", str(data), "--concepts", "red", "--out", str(out)]
        )
        == 1
    )
    assert "line 1: field 'concepts': unknown concept 'large'" in capsys.readouterr().err
