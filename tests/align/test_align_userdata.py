"""A user's JSONL files for `mmfusion align` (mmfusion.align.userdata) and the learned-judge evaluation of a
run on them (align.pipeline.evaluate_user)."""

import pytest
import torch

from mmfusion.align.pipeline import evaluate_user
from mmfusion.align.userdata import load_prompts, load_sft_pairs
from mmfusion.align.vocab import WordVocab
from mmfusion.errors import DataError
from mmfusion.unified.model import UnifiedConfig, UnifiedDecoder


def _write(path, text):
    path.write_text(text)
    return path


def test_sft_pairs_and_prompts_and_their_errors(tmp_path):
    p = _write(
        tmp_path / "s.jsonl",
        '{"prompt": "hi", "response": "hello"}\n\n{"prompt": "bye", "response": "ciao"}\n',
    )
    assert load_sft_pairs(p) == [("hi", "hello"), ("bye", "ciao")]
    p = _write(tmp_path / "p.jsonl", '{"prompt": "hi", "id": 3}\n{"prompt": "bye"}\n')
    assert load_prompts(p) == ["hi", "bye"]  # other fields are ignored
    with pytest.raises(DataError, match=r"s2.jsonl:2: 'response' must be a non-empty string; got None"):
        load_sft_pairs(_write(tmp_path / "s2.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n'))
    with pytest.raises(DataError, match=r"p2.jsonl:1: not valid JSON"):
        load_prompts(_write(tmp_path / "p2.jsonl", '{"prompt": \n'))
    with pytest.raises(DataError, match=r"p3.jsonl:1: expected a JSON object"):
        load_prompts(_write(tmp_path / "p3.jsonl", '["hi"]\n'))
    with pytest.raises(DataError, match=r"p4.jsonl: no rows"):
        load_prompts(_write(tmp_path / "p4.jsonl", "\n"))
    with pytest.raises(
        DataError, match=r"gone.jsonl not found: expected a JSONL file of \{\"prompt\"\} rows"
    ):
        load_prompts(tmp_path / "gone.jsonl")


class FixedScorer:
    """A scorer whose score is fixed per prompt: the first word's id decides it."""

    def __init__(self, by_first_word):
        self.by_first_word = by_first_word

    def score(self, vocab, prompts, responses):
        return torch.tensor([self.by_first_word[vocab.itos[p[1]]] for p in prompts])


def test_evaluate_user_reports_the_learned_models_scores():
    vocab = WordVocab.from_texts(["alpha beta gamma delta"])
    torch.manual_seed(0)
    decoder = UnifiedDecoder(UnifiedConfig(vocab_size=len(vocab), dim=8, depth=1, heads=2, max_len=12)).eval()
    prompts = ["alpha", "beta", "gamma", "delta"]
    reward = FixedScorer({"alpha": 1.0, "beta": 2.0, "gamma": 3.0, "delta": 6.0})
    # cost logits: two above 0 (harmful by the cost model), one exactly 0 (P = 0.5: not above), one below
    cost = FixedScorer({"alpha": 2.0, "beta": 0.5, "gamma": 0.0, "delta": -3.0})
    out = evaluate_user(decoder, vocab, prompts, 4, 0, reward, cost)
    assert out["n"] == 4.0 and out["reward_model_mean"] == 3.0
    assert out["harmful_by_cost_model"] == 0.5
    assert out["cost_model_mean"] == pytest.approx(
        float(torch.sigmoid(torch.tensor([2.0, 0.5, 0.0, -3.0])).mean())
    )
