"""A unified run through the common Trainer (mmfusion.unified.recipe / rows): the exact token layout of the
collate on hand-made rows, task inference and skips, a short run that lowers the loss, exact resume,
accumulation equivalence, the model folder (load_model, generate, serving's lookup) and evaluation.

Scale: a JSONL of 16 px scenes written here (PNG images, 16 kHz WAV clips, captions, VQA fields and lists, one
broken image, one row without a task); a VQ-VAE trained 20 steps by the recipe, an untrained 16-code audio
tokenizer, a 96-id BPE, a width-32 one-layer decoder.
"""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file

from mmfusion import load_model
from mmfusion.config import TrainConfig
from mmfusion.data.sources import JsonlDataset, SkippedSample
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.errors import ConfigError
from mmfusion.modalities.image import preprocess_image
from mmfusion.models.vq import VQVAE, AudioFrontEnd
from mmfusion.unified.bundle import UnifiedBundle, save_audio_tokenizer
from mmfusion.unified.config import UnifiedModelConfig
from mmfusion.unified.evaluate import evaluate_unified
from mmfusion.unified.model import AUDIO, IMAGE, TEXT
from mmfusion.unified.recipe import fit_unified, prepare_unified
from mmfusion.unified.rows import Example, row_examples, row_tasks


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """rows 0-9 image + caption, 10-15 image + question/answer fields, 16 image + caption + a vqa list of two,
    17-22 audio + caption, 23 a broken PNG with a caption, 24 a caption alone (no task)."""
    d = tmp_path_factory.mktemp("unified_rows")
    (d / "img").mkdir()
    (d / "wav").mkdir()
    world = SyntheticWorld(WorldConfig(seed=0, image_size=16))
    lines = []
    for i in range(23):
        s = world.sample("train", i, ("image", "text", "audio", "vqa"))
        row = {"id": f"r{i}"}
        if i < 17:
            Image.fromarray(s["image"]).save(d / "img" / f"{i}.png")
            row["image"] = f"img/{i}.png"
        if i < 10 or i >= 16:
            row["text"] = s["text"]
        if 10 <= i < 16:
            row.update(question=s["vqa"][0]["question"], answer=s["vqa"][0]["answer"])
        if i == 16:
            row["vqa"] = s["vqa"][:2]
        if i >= 17:
            sf.write(d / "wav" / f"{i}.wav", s["audio"], s["audio_sr"], subtype="PCM_16")
            row["audio"] = f"wav/{i}.wav"
        lines.append(row)
    (d / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    lines.append({"id": "broken", "image": "img/broken.png", "text": "a small red circle"})
    lines.append({"id": "lonely", "text": "a caption without media"})
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    frontend = AudioFrontEnd(seconds=0.25, n_mels=16, hop=320)  # 16 x 16 log-mel -> 4 x 4 = 16 codes
    torch.manual_seed(0)
    vq = VQVAE(
        image_size=16, channels=4, codebook_size=8, code_dim=4, in_channels=1, input_shape=frontend.shape
    )
    save_audio_tokenizer(vq.eval(), frontend, d / "atok")
    return d


def model_config(manifest, **kw) -> UnifiedModelConfig:
    tok = dict(kind="vq", steps=20, codebook_size=16, image_size=16, channels=8, code_dim=8, batch_size=8)
    return UnifiedModelConfig(
        width=32, depth=1, heads=2, text_vocab_size=96, audio_tokenizer=str(manifest / "atok"),
        image_tokenizer=tok, **kw,
    )  # fmt: skip


def train_config(**kw) -> TrainConfig:
    base = dict(
        steps=6, batch_size=8, lr=3e-3, warmup_steps=2, weight_decay=0.01, betas=(0.9, 0.95), min_lr_ratio=0.1,
        precision="fp32", device="cpu", checkpoint_every=3, keep_checkpoints=5, log_every=1, progress=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(manifest, tmp_path_factory):
    rows = JsonlDataset(manifest / "rows.jsonl")
    return prepare_unified(model_config(manifest), rows, tmp_path_factory.mktemp("prep"), log=lambda m: None)


def test_rows_give_tasks_by_their_fields():
    assert row_tasks({"image": 1, "text": "a b"}, audio=False) == ["caption", "image"]
    assert row_tasks({"image": 1, "meta": {"question": "q?", "answer": "a"}}, audio=False) == ["vqa"]
    assert row_tasks({"audio": 1, "audio_sr": 16000, "text": "a b"}, audio=True) == ["audio_caption"]
    assert row_tasks({"audio": 1, "text": "a b", "image": None}, audio=False) == []
    assert row_tasks({"image": 1, "text": "  "}, audio=True) == []
    rows = [{"image": 1, "text": "x"}] * 3 + [
        {"audio": 1, "text": "y", "id": "a"},
        SkippedSample("s", "bad_json", ""),
    ]
    examples, skipped = row_examples(rows, audio=False, uncond_every=2)
    assert examples == [
        Example(0, "caption"), Example(0, "image"), Example(0, "image", uncond=True),
        Example(1, "caption"), Example(1, "image"),
        Example(2, "caption"), Example(2, "image"), Example(2, "image", uncond=True),
    ]  # fmt: skip
    assert skipped == [("a", "no_audio_tokenizer"), ("s", "bad_json")]


def test_preparation_counts_tasks_and_skips(setup):
    # 12 captioned rows (0-9, 16, the broken one) -> 12 caption + 12 image + 2 caption-less (the 1st and 11th);
    # 6 question/answer rows + a list of 2; 6 audio clips; "lonely" has no task
    assert setup.task_sizes == {"caption": 12, "image": 14, "vqa": 8, "audio_caption": 6}
    assert dict(setup.skipped) == {"missing_modality": 1}
    v = setup.vocab
    assert (v.n_image, v.tokens_per_image, v.n_audio, v.tokens_per_audio) == (16, 16, 8, 16)
    assert setup.decoder_config.vocab_size == v.size and setup.decoder_config.dim == 32


def test_collate_gives_the_exact_token_layout(manifest, setup):
    rows = JsonlDataset(manifest / "rows.jsonl")
    caption, vqa, audio = rows[0], rows[10], rows[17]
    batch = setup.collate([
        {**caption, "task": "caption"}, {**caption, "task": "image", "text": None}, {**vqa, "task": "vqa"},
        {**audio, "task": "audio_caption"}, rows[23], {"id": "x", "text": "no media"},
    ])  # fmt: skip
    v, tok = setup.vocab, setup.text_tokenizer
    codes = setup.vqvae.encode(preprocess_image(caption["image"], 16)[None])[0].flatten() + v.n_text
    qcodes = setup.vqvae.encode(preprocess_image(vqa["image"], 16)[None])[0].flatten() + v.n_text
    frontend = setup.audio_frontend
    acodes = setup.audio_vqvae.encode(frontend([audio["audio"]], [16000]))[0].flatten() + v.n_text + v.n_image

    def bpe(text):
        return tok.tokenizer.encode(text).ids

    cap, q, a, acap = (
        bpe(caption["text"]),
        bpe(vqa["meta"]["question"]),
        bpe(vqa["meta"]["answer"]),
        bpe(audio["text"]),
    )
    expected = [
        ([v["<bos>"], v["<caption>"], v["<boi>"], *codes.tolist(), v["<eoi>"]], [*cap, v["<eos>"]]),
        ([v["<bos>"], v["<gen_image>"], v["<boi>"]], [*codes.tolist(), v["<eoi>"], v["<eos>"]]),
        ([v["<bos>"], v["<vqa>"], v["<boi>"], *qcodes.tolist(), v["<eoi>"], *q, v["<answer>"]], [*a, v["<eos>"]]),
        ([v["<bos>"], v["<audio_caption>"], v["<boa>"], *acodes.tolist(), v["<eoa>"]], [*acap, v["<eos>"]]),
    ]  # fmt: skip
    width = max(len(p) + len(t) for p, t in expected)
    assert batch["ids"].shape == (4, width)
    for row, (prompt, target) in enumerate(expected):
        n = len(prompt) + len(target)
        assert batch["ids"][row].tolist() == prompt + target + [v.pad] * (width - n)
        assert batch["loss_mask"][row].tolist() == [False] * len(prompt) + [True] * len(target) + [False] * (
            width - n
        )
    mod = batch["modality"]
    assert mod[0, 3:19].eq(IMAGE).all() and mod[0, :3].eq(TEXT).all() and mod[0, 19:].eq(TEXT).all()
    assert mod[3, 3:19].eq(AUDIO).all() and (mod[3] == IMAGE).sum() == 0
    assert batch.mask["text"].tolist() == [True, False, True, True]
    assert batch.mask["image"].tolist() == [True, True, True, False]
    assert batch.mask["audio"].tolist() == [False, False, False, True]
    assert batch.meta["task"] == ["caption", "image", "vqa", "audio_caption"]
    assert batch.meta["skipped"] == [("broken", "corrupt_image"), ("x", "missing_modality")]


def test_config_errors_name_the_field(manifest):
    with pytest.raises(ValueError, match="hierarchical_layers = 2: expected an integer in \\[0, depth=1\\]"):
        UnifiedModelConfig(depth=1, hierarchical_layers=2)
    with pytest.raises(ValueError, match="width = 130: expected a multiple of heads"):
        UnifiedModelConfig(width=130)
    with pytest.raises(
        ValueError, match="steps: training settings, but path = 'tok' names a trained tokenizer"
    ):
        UnifiedModelConfig(image_tokenizer={"path": "tok", "steps": 5})
    with pytest.raises(ValueError, match="audio_caption, which needs audio_tokenizer"):
        UnifiedModelConfig(tasks=["caption", "audio_caption"])
    with pytest.raises(ConfigError, match="train.stages: not supported for a unified model"):
        fit_unified(
            model_config(manifest), train_config(steps=2, stages=[{"name": "a", "steps": 2}]), [], "unused"
        )


def _fit(manifest, run, resume=False, eval_rows=None, **kw):
    rows = JsonlDataset(manifest / "rows.jsonl")
    return fit_unified(model_config(manifest), train_config(**kw), rows, run, resume=resume, log=lambda m: None,
                       eval_rows=eval_rows, eval_max_rows=3)  # fmt: skip


def _weights(run):
    return load_file(str(run / "model" / "decoder" / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    """The 6-step run, its copy resumed from the step-3 checkpoint, and a 60-step run at lr 1e-2 that evaluates
    (3 rows) every 30 steps."""
    root = tmp_path_factory.mktemp("runs")
    _fit(manifest, root / "full")
    shutil.copytree(root / "full", root / "part")
    shutil.rmtree(root / "part" / "checkpoints" / "step-00000006")
    shutil.rmtree(root / "part" / "model")
    _fit(manifest, root / "part", resume=True)
    held = JsonlDataset(manifest / "rows.jsonl")  # (the training rows: only the logging is checked)
    _fit(manifest, root / "long", steps=60, lr=1e-2, checkpoint_every=60, eval_every=30, eval_rows=held)
    return root


def test_resume_is_bitwise_identical(runs):
    full, part = _weights(runs / "full"), _weights(runs / "part")
    assert full.keys() == part.keys()
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_a_short_run_lowers_the_loss_and_counts_skips(manifest, runs, setup):
    rows = [json.loads(line) for line in (runs / "long" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "val/caption_bleu" in r]
    assert [r["step"] for r in evals] == [30, 60] and evals[0]["val/caption_n"] == 3
    assert len(losses) == 60 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    last = [r for r in rows if "loss" in r][-1]
    assert {"ce_text", "ce_image", "max_attn_logit", "source/vqa", "target/vqa"} <= set(last)
    # the broken image is skipped every time a step draws it; the row without a task once, at preparation
    data = setup.train_data(8, seed=0)
    broken = [i for i, e in enumerate(data.dataset.examples) if e.row == 23]
    drawn = sum(i in broken for s in range(60) for i in data.step_indices(s))
    errors = json.loads((runs / "long" / "data_errors.json").read_text())
    assert drawn >= 1 and errors == {"corrupt_image": drawn, "missing_modality": 1}


def test_accumulation_2x2_equals_batch_of_4(manifest, tmp_path):
    _fit(manifest, tmp_path / "one", steps=3, batch_size=4)
    _fit(manifest, tmp_path / "two", steps=3, batch_size=4, accumulation=2)
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-5)


def test_the_model_folder_loads_generates_and_evaluates(manifest, runs, capsys):
    from mmfusion.cli import main
    from mmfusion.serve.generate import unified_folder

    run = runs / "long"
    bundle = load_model(run)
    assert isinstance(bundle, UnifiedBundle) and bundle.audio_vqvae is not None
    assert bundle.config == model_config(manifest)
    assert json.loads((run / "model" / "config.json").read_text())["model_type"] == "unified"
    assert json.loads((run / "model" / "train.json").read_text())["tasks"]["vqa"] == 8
    assert unified_folder(run) == run / "model"
    code = main(["generate", "--model", str(run), "--task", "caption", "--image", str(manifest / "img/0.png"),
                 "--max-new-tokens", "4"])  # fmt: skip
    assert code == 0 and capsys.readouterr().out.startswith(str(manifest / "img/0.png") + "\t")
    metrics = evaluate_unified(bundle, JsonlDataset(manifest / "rows.jsonl"), max_new_tokens=4)
    assert (metrics["caption_n"], metrics["vqa_n"], metrics["audio_caption_n"]) == (11, 8, 6)
    assert metrics["skipped"] == {"corrupt_image": 1, "missing_modality": 1}
    assert 0 <= metrics["vqa_exact_match"] <= 1 and metrics["caption_bleu"] >= 0


def test_mixed_task_data_follows_the_mixture_and_splits_steps_over_ranks():
    from mmfusion.batch import Batch
    from mmfusion.unified.rows import ExampleDataset, MixedTaskData

    rows = [
        {"id": f"r{i}", "image": 1, "text": "a b", "vqa": [{"question": "q", "answer": "a"}] * 5}
        for i in range(40)
    ]
    examples, _ = row_examples(rows, audio=False, uncond_every=0)  # 40 caption, 40 image, 200 vqa

    def ids(samples):
        return Batch({"n": torch.zeros(len(samples))}, {}, {"id": [(s["id"], s["task"]) for s in samples]})

    data = MixedTaskData(
        ExampleDataset(rows, examples), [1] * 40 + [2] * 240, ids, 8, seed=3, temperature=2.0
    )
    p = {"caption": 40**0.5, "image": 40**0.5, "vqa": 200**0.5}
    assert data.probabilities == pytest.approx({k: v / sum(p.values()) for k, v in p.items()}, abs=1e-12)
    drawn = [data.dataset.examples[i].task for s in range(1000) for i in data.step_indices(s)]
    for task, prob in data.probabilities.items():
        assert abs(drawn.count(task) / len(drawn) - prob) < 0.02
    # the global batch of a step is the same whatever the ranks and micro-batches; loss_norm splits its tokens
    whole = next(data.step_batches(0, 5, rank=0, world=1, accumulation=1))
    parts = [b for r in (0, 1) for b in next(data.step_batches(0, 5, rank=r, world=2, accumulation=2))]
    assert sorted(x for b in parts for x in b.meta["id"]) == sorted(whole[0].meta["id"])
    tokens = sum(data.targets[i] for i in data.step_indices(5))
    assert whole[0].meta["loss_norm"] == tokens and {b.meta["loss_norm"] for b in parts} == {tokens / 4}
    # resuming at step 5 gives the batches an uninterrupted epoch gives there
    epoch = list(data.step_batches(0, 0, rank=0, world=1, accumulation=1))
    assert [b[0].meta["id"] for b in epoch[5:]] == [b[0].meta["id"] for b in data.step_batches(0, 5, 0, 1, 1)]
