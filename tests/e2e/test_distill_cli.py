"""Cross-modal distillation from YAML (T5): an image teacher trained on the paired_colour task, then an audio
student with train.distill through `mmfusion train`; the student folder evaluates like any model, and the
student distilled without labels beats the same student trained alone on 16 labels."""

import json

import pytest

SMALL = [
    *("--set", "task.name=paired_colour", "--set", "task.n_train=256", "--set", "task.n_test=64"),
    *("--set", "train.batch_size=32", "--set", "train.log_every=5", "--set", "train.progress=false"),
    *("--set", "train.threads=1", "--set", "train.lr=3e-3", "--set", "train.warmup_steps=2"),
    *("--set", "fusion_model.dim=32", "--set", "fusion_model.fusion=late"),
]
STUDENT = ["--set", "train.steps=60", "--set", "fusion_model.encoders={audio: tiny}"]


@pytest.mark.timeout(300)
def test_image_teacher_distils_into_an_audio_student(mmfusion, tmp_path):
    """An image teacher (100 steps on 256 labels), then the same audio student two ways for 60 steps each:
    distilled from the teacher with no labels at all, and alone on the first 16 labels. Measured on the 64 test
    scenes (8 colours, chance 0.125): teacher 0.672, distilled 0.625, alone 0.391. KD at temperature 1: with a
    teacher this weak the recipe's T = 4 targets are nearly flat, and 40 distilled steps at T = 4 reached only
    0.28."""
    mmfusion(
        "train", *SMALL, "--set", "name=teacher", "--set", "train.steps=100",
        "--set", "fusion_model.encoders={image: tiny}", cwd=tmp_path,
    )  # fmt: skip
    teacher = tmp_path / "runs" / "teacher"
    assert json.loads((teacher / "metrics.json").read_text())["accuracy_all"] > 0.5
    proc = mmfusion(
        "train", *SMALL, "--set", "name=student", *STUDENT,
        "--set", f"train.distill={{teacher: {teacher / 'model'}, alpha: 1.0, n_labelled: 0, temperature: 1.0}}",
        cwd=tmp_path,
    )  # fmt: skip
    assert "distilling from" in proc.stdout
    student = tmp_path / "runs" / "student"
    rows = [json.loads(r) for r in (student / "metrics.jsonl").read_text().splitlines()]
    assert all(
        r["labelled"] == 0 and r["ce"] == 0 and r["kd"] > 0 for r in rows if "kd" in r
    )  # no labels used
    config = json.loads((student / "model" / "config.json").read_text())
    assert "audio" in json.dumps(config) and "image" not in json.dumps(
        config["model"]["encoders"]
    )  # the student alone
    distilled = json.loads((student / "metrics.json").read_text())
    assert distilled["n"] == 64
    mmfusion(
        "train", *SMALL, "--set", "name=alone", *STUDENT, "--set", "task.n_train=16", "--set", "train.batch_size=16",
        cwd=tmp_path,
    )  # fmt: skip
    alone = json.loads((tmp_path / "runs" / "alone" / "metrics.json").read_text())
    acc, acc_alone = distilled["accuracy_all"], alone["accuracy_all"]
    assert acc >= acc_alone + 0.12, (acc, acc_alone)  # measured 0.625 vs 0.391; 0.172 with the KD term zeroed


def test_distill_config_errors_name_the_field(mmfusion, tmp_path):
    bad = mmfusion("train", "--set", "train.distill={teacher: x, alpha: 2}", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "train.distill.alpha = 2" in bad.stderr
    bad = mmfusion("train", "--set", "train.distill={teacher: x}", cwd=tmp_path, check=False)
    assert (
        bad.returncode == 2
        and "train.distill trains a fusion-model student: set model.kind: fusion" in bad.stderr
    )
