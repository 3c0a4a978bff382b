"""Reward / cost models from JSONL labels (mmfusion.align.scorer)."""

import json

import pytest
import torch

from mmfusion.align.scorer import ScoreModel, load_labels, train_score_model
from mmfusion.align.vocab import WordVocab
from mmfusion.errors import DataError
from mmfusion.unified.model import UnifiedConfig


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_load_labels_reads_both_row_kinds_and_names_bad_rows(tmp_path):
    rows = [
        {"prompt": "hi", "response": "hello there", "reward": 0.8, "cost": 0},
        {"prompt": "hi", "response": "go away", "cost": 1},
        {"prompt": "hi", "chosen": "hello there", "rejected": "go away"},
    ]
    labelled, prefs = load_labels(_write(tmp_path / "a.jsonl", rows))
    assert [(r.response, r.reward, r.cost) for r in labelled] == [
        ("hello there", 0.8, 0.0),
        ("go away", None, 1.0),
    ]
    assert prefs[0].chosen == "hello there" and prefs[0].rejected == "go away"
    with pytest.raises(DataError, match=r"b.jsonl:2: 'cost' = 2 must lie in \[0.0, 1.0\]"):
        load_labels(_write(tmp_path / "b.jsonl", [rows[0], {"prompt": "x", "response": "y", "cost": 2}]))
    with pytest.raises(DataError, match=r"c.jsonl:1: a row needs 'response'"):
        load_labels(_write(tmp_path / "c.jsonl", [{"prompt": "x", "response": "y"}]))
    with pytest.raises(DataError, match="'chosen' must be a non-empty string"):
        load_labels(_write(tmp_path / "d.jsonl", [{"prompt": "x", "rejected": "y"}]))


def test_cost_and_reward_models_learn_from_a_users_jsonl(tmp_path):
    safe = ["have a nice day", "the sky is blue", "thank you kindly", "see you soon"]
    harmful = ["you are stupid", "stupid idea", "that is stupid indeed", "so stupid"]
    rows = [{"prompt": "say something", "response": t, "cost": 0, "reward": 1.0} for t in safe]
    rows += [{"prompt": "say something", "response": t, "cost": 1, "reward": 0.0} for t in harmful]
    rows += [{"prompt": "say something", "chosen": s, "rejected": h} for s, h in zip(safe, harmful)]
    labelled, prefs = load_labels(_write(tmp_path / "u.jsonl", rows))
    vocab = WordVocab.from_texts([r["prompt"] for r in rows] + safe + harmful)
    cfg = UnifiedConfig(vocab_size=len(vocab), dim=16, depth=1, heads=2, max_len=16)
    prompts = [vocab.prompt_ids("say something")] * 8
    responses = [vocab.response_ids(t) for t in safe + harmful]
    for kind, pairs in (("cost", ()), ("reward", prefs)):
        torch.manual_seed(0)
        model = ScoreModel(cfg)
        losses = train_score_model(model, vocab, kind, labelled, pairs, steps=40, batch_size=8, lr=2e-2)
        assert losses[-1] < losses[0] / 4
        s = model.score(vocab, prompts, responses)
        if kind == "cost":
            assert (torch.sigmoid(s[4:]) > 0.5).all() and (torch.sigmoid(s[:4]) < 0.5).all()
        else:
            assert s[:4].min() > s[4:].max()
