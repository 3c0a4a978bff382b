"""`train.parallel` through `mmfusion train --nproc 2` (torchrun, gloo): FSDP2 and FSDP2 x tensor parallel
follow the one-process loss curve at the same global batch, sharded checkpoints resume, and the saved model is
the whole (unsharded) model."""

import json
import shutil
from pathlib import Path

import pytest

from clirun import run_mmfusion

ROOT = Path(__file__).parents[2]
TINY = ROOT / "tests" / "e2e" / "tiny.yaml"
ENV = {"OMP_NUM_THREADS": "1"}


def mmfusion(*args, cwd):
    """`mmfusion train *args` (tests/clirun.py); at most 180 s: a test's three runs stay under its 600 s."""
    return run_mmfusion("train", *args, cwd=cwd, env=ENV, timeout=180)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float], tol: float) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a, b)


@pytest.mark.timeout(600)
def test_fsdp_matches_one_process_and_resumes_from_a_sharded_checkpoint(tmp_path):
    common = ["--config", str(TINY), "--set", "train.log_every=1", "--set", "train.steps=20"]
    common += ["--set", "train.checkpoint_every=10", "--set", "train.keep_checkpoints=3"]
    mmfusion(*common, "--no-eval", "--set", "name=one", cwd=tmp_path)
    pin = ["--set", f"model.text.tokenizer={tmp_path / 'runs' / 'one' / 'tokenizer.json'}"]
    fsdp = ["--nproc", "2", "--set", "train.parallel.fsdp.enabled=true", *pin]
    proc = mmfusion(*common, *fsdp, "--set", "name=two", cwd=tmp_path)
    assert "(FSDP2 over 2), global batch 32 = 2 x 1 x 16" in proc.stdout
    one, two = losses(tmp_path / "runs" / "one"), losses(tmp_path / "runs" / "two")
    assert len(one) == 20 and one[20] < one[1]
    assert_close(one, two, 1e-4)  # the same global batch: equal up to float reordering
    run = tmp_path / "runs" / "two"
    ckpt = run / "checkpoints" / "step-00000010"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        ".metadata",
        "MANIFEST.json",
        "__0_0.distcp",
        "__1_0.distcp",
        "state.json",
    ]
    # the evaluation after training loaded the saved (gathered, unsharded) model
    assert json.loads((run / "metrics.json").read_text())["n_pairs"] > 0

    # as if it had died after step 10: resume from the sharded checkpoint
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "runs", part / "runs")
    shutil.rmtree(part / "runs" / "two" / "checkpoints" / "step-00000020")
    kept = [
        line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 10
    ]
    (part / "runs" / "two" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    proc = mmfusion(*common, *fsdp, "--set", "name=two", "--resume", "--no-eval", cwd=part)
    assert "resumed from" in proc.stdout and "step 10" in proc.stdout
    assert_close(losses(part / "runs" / "two"), two, 1e-6)


@pytest.mark.timeout(600)
def test_fsdp_times_tensor_parallel_task_run_matches_one_process(tmp_path):
    common = [
        "--config",
        str(ROOT / "configs" / "vqa_fusion.yaml"),
        *("--set", "train.steps=6", "--set", "train.log_every=1", "--set", "train.batch_size=32"),
        *("--set", "task.n_train=192", "--set", "task.n_test=32", "--set", "train.progress=false"),
        *("--set", "fusion_model.encoders.image=tiny", "--set", "fusion_model.encoders.text=tiny"),
        *("--set", "fusion_model.modality_dropout=0.0"),
    ]
    mmfusion(*common, "--set", "name=one", cwd=tmp_path)
    tp = [
        "--nproc",
        "2",
        "--set",
        "train.parallel.tensor.size=2",
        "--set",
        "train.parallel.fsdp.enabled=true",
    ]
    proc = mmfusion(*common, *tp, "--set", "name=tp", cwd=tmp_path)
    assert "(FSDP2 over 1 x tensor parallel 2), global batch 32 = 1 x 1 x 32" in proc.stdout
    one, tp_run = tmp_path / "runs" / "one", tmp_path / "runs" / "tp"
    assert_close(losses(one), losses(tp_run), 1e-4)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (one, tp_run))
    assert abs(a["accuracy_all"] - b["accuracy_all"]) <= 1 / 32  # the same model, evaluated from its folder
