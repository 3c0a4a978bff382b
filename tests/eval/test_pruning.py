"""Router modality pruning from the command line (mmfusion.eval.pruning): `mmfusion eval --prune-threshold` and
`mmfusion serve --prune-threshold` report what they pruned; other models are a config error (exit 2)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from mmfusion.cli import main
from mmfusion.config import config_from_dict
from mmfusion.run import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """A router-fusion run (image + text, vqa) and a late-fusion one."""
    out = tmp_path_factory.mktemp("pruning")
    train(config_from_dict(tiny_run(out, "router")), log=lambda m: None)
    train(
        config_from_dict(tiny_run(out, "late", fusion_model={"fusion": "late"}, train={"steps": 1})),
        log=lambda m: None,
    )
    return out


def evaluate(run, threshold, out):
    assert main(["eval", str(run), "--prune-threshold", str(threshold), "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_eval_reports_pruned_rows_and_accuracy(runs, tmp_path):
    everything = evaluate(runs / "router", 0.0, tmp_path / "t0")
    assert everything["pruned_text"] == 0.0 and everything["accuracy_pruned"] == everything["accuracy_all"]
    pruned = evaluate(runs / "router", 1.0, tmp_path / "t1")  # every gate is < 1: text skipped on every row
    assert pruned["prune_threshold"] == 1.0 and pruned["pruned_text"] == 1.0
    assert pruned["accuracy_pruned"] == pruned["accuracy_without_text"]


def test_eval_refuses_models_without_router_gates(runs, tmp_path, capsys):
    assert main(["eval", str(runs / "late"), "--prune-threshold", "0.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("modality pruning needs a fusion model with the router fusion (its gates decide which "
                        "encoders to skip); this run is a late fusion model") and "\n" not in err  # fmt: skip
    assert main(["eval", str(runs / "router"), "--prune-threshold", "1.5"]) == 2
    assert "--prune-threshold = 1.5: a router gate threshold in [0, 1]" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--prune-threshold", "0.5"]) == 2  # no config.yaml: a two-tower run
    assert "is a two-tower run; modality pruning is for router-fusion models" in capsys.readouterr().err


def png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def classify(run, threshold, inputs):
    from fastapi.testclient import TestClient

    from mmfusion import load_model
    from mmfusion.evaluate import pruning_model
    from mmfusion.serve.app import create_app
    from mmfusion.serve.backend import LocalBackend
    from mmfusion.serve.engine import Engine
    from mmfusion.serve.http import ServeSettings

    model, means = (load_model(run), None) if threshold is None else pruning_model(run, threshold)
    settings = ServeSettings(batching=False, cache=False)
    engine = Engine(model, prune_threshold=threshold, prune_means=means)
    app = create_app(backend=LocalBackend(engine, settings), settings=settings)
    with TestClient(app) as c:
        health = c.get("/healthz").json()
        return health, c.post("/v1/classify", json={"inputs": inputs}).json()["predictions"]


def test_serve_lists_each_predictions_pruned_modalities(runs):
    both, alone = {"image": png(0), "text": "what colour is the circle?"}, {"image": png(0)}
    health, pruned = classify(runs / "router", 1.0, [both, {"text": "is there a cross?"}])
    assert health["prune_threshold"] == 1.0
    assert [p["pruned"] for p in pruned] == [["text"], []]  # a row's only modality is never skipped
    _, plain = classify(runs / "router", None, [alone])
    np.testing.assert_allclose(pruned[0]["logits"], plain[0]["logits"], atol=1e-6)  # = the image alone
    assert "pruned" not in plain[0]
    _, kept = classify(runs / "router", 0.0, [both])
    assert kept[0]["pruned"] == []


def test_serve_refuses_what_it_cannot_prune(runs, tmp_path, capsys, make_tiny_model):
    assert main(["serve", str(runs / "late"), "--prune-threshold", "0.5"]) == 2
    assert "is a late fusion model" in capsys.readouterr().err
    assert main(["serve", str(runs / "router"), "--prune-threshold", "0.5", "--split"]) == 2
    assert "--prune-threshold with --split" in capsys.readouterr().err
    make_tiny_model().save_pretrained(tmp_path / "tt")
    assert main(["serve", str(tmp_path / "tt"), "--prune-threshold", "0.5"]) == 2
    assert "has no config.yaml (serve the run directory" in capsys.readouterr().err
