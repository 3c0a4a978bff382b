"""`mmfusion train` with task.mixture (D3, T9): sources of modality combinations mixed by a sampler, the
realised mixture logged per window and plotted, resumable."""

import json
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[2] / "configs" / "vqa_mixture.yaml"
SMALL = [
    "--set",
    "train.steps=16",
    "--set",
    "train.batch_size=32",
    "--set",
    "train.log_every=4",
    "--set",
    "train.checkpoint_every=8",
    "--set",
    "task.n_test=32",
    "--set",
    "task.mixture.sources.0.n=96",
    "--set",
    "task.mixture.sources.1.n=64",
    "--set",
    "task.mixture.curriculum.1.step=8",
    "--set",
    "train.progress=false",
    "--set",
    "train.threads=1",
]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_mixture_run_logs_and_plots_the_realised_mixture(mmfusion, tmp_path):
    proc = mmfusion("train", "--config", str(RECIPE), *SMALL, "--no-eval", cwd=tmp_path)
    run = tmp_path / "runs" / "vqa_mixture"
    assert "mixture (target at step 0): image_question=1.000, question_only=0.000" in proc.stdout
    assert (run / "mixture.png").stat().st_size > 1000
    logged = [r for r in rows(run) if "source/image_question" in r]
    assert [r["step"] for r in logged] == [4, 8, 12, 16]
    first, last = logged[0], logged[-1]
    # the curriculum goes linearly from [1, 0] at step 0 to [0.75, 0.25] at step 8: the first window's
    # target is the mean over steps 0-3, 1 - 0.25 * 1.5 / 8
    assert first["target/image_question"] == pytest.approx(1 - 0.25 * 1.5 / 8)
    assert first["source/question_only"] < 0.15
    assert last["target/question_only"] == pytest.approx(0.25)
    assert 0.0 < last["source/question_only"] < 0.6
    # the question-only samples have no image: the per-modality mix shows it (S7)
    assert last["mix/image"] == pytest.approx(1 - last["source/question_only"])
    assert last["mix/text"] == 1.0

    # resume from the step-8 checkpoint replays the sampler: the same stream as uninterrupted
    part = tmp_path / "part"
    part.mkdir()
    import shutil

    shutil.copytree(run, part / "runs" / "vqa_mixture")
    shutil.rmtree(part / "runs" / "vqa_mixture" / "checkpoints" / "step-00000016")
    (part / "runs" / "vqa_mixture" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows(run) if r["step"] <= 8)
    )
    mmfusion("train", "--config", str(RECIPE), *SMALL, "--no-eval", "--resume", cwd=part)
    resumed = [r for r in rows(part / "runs" / "vqa_mixture") if "source/image_question" in r]
    for a, b in zip(logged, resumed):
        assert a["source/question_only"] == b["source/question_only"] and a["loss"] == pytest.approx(
            b["loss"]
        )


def test_mixture_config_errors_name_the_field(mmfusion, tmp_path):
    bad = mmfusion(
        "train",
        "--config",
        str(RECIPE),
        "--set",
        "task.mixture.sources.1.modalities=[audio]",
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2
    assert (
        "data.mixture.sources.1.modalities = ['audio']: pick a non-empty subset of the model's inputs"
        in bad.stderr
    )
    bad = mmfusion(
        "train",
        "--config",
        str(RECIPE),
        "--set",
        "task.mixture.weighting=temperature",
        cwd=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "curriculum is set but weighting = 'temperature'" in bad.stderr
