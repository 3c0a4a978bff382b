import pytest
import torch

from mmfusion.errors import DataError
from mmfusion.modalities.text import TextEncoder, TextTokenizer, pad_rows

CAPTIONS = [
    "a small red circle",
    "a large blue square to the left of a small green triangle",
    "there is a large yellow diamond",
    "from left to right: a small white cross, a large cyan circle and a small purple square",
] * 5


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.train(CAPTIONS, vocab_size=120, context_length=12)


def test_round_trip_and_special_ids(tok):
    ids = tok.encode(["a small red circle"])
    assert ids.shape == (1, 5)  # four words + [EOT]
    assert ids[0, -1].item() == tok.eot_id == 2
    assert tok.decode(ids[0].tolist()) == "a small red circle"
    assert tok.decode(tok.encode(["A Large  BLUE square"])[0].tolist()) == "a large blue square"  # normalised


def test_padding_truncation_and_eot(tok):
    ids = tok.encode(["a small red circle", CAPTIONS[3]])
    assert ids.shape == (2, 12)  # the long caption is truncated to the context length, [EOT] kept last
    assert ids[1, -1].item() == tok.eot_id
    assert ids[0, 5:].eq(0).all() and ids[0, 4].item() == tok.eot_id


def test_pad_rows_right_pads_to_the_longest_or_to_pad_to_and_refuses_a_longer_row():
    assert pad_rows([[5, 6, 7], [8]], 0).tolist() == [[5, 6, 7], [8, 0, 0]]
    out = pad_rows([(5,), (8, 9)], 1, pad_to=4)
    assert out.dtype == torch.long and out.tolist() == [[5, 1, 1, 1], [8, 9, 1, 1]]
    assert pad_rows([], 0, pad_to=3).shape == (0, 3)
    with pytest.raises(DataError, match=r"text #1 has 3 tokens; the padded length is 2"):
        pad_rows([[1], [1, 2, 3]], 0, pad_to=2)


def test_save_load(tmp_path, tok):
    tok.save(tmp_path)
    again = TextTokenizer.load(tmp_path, 12)
    assert torch.equal(again.encode(CAPTIONS[:4]), tok.encode(CAPTIONS[:4]))
    with pytest.raises(DataError, match="tokenizer.json not found"):
        TextTokenizer.load(tmp_path / "nope", 12)


def test_encoder_pools_at_eot_and_ignores_padding(tok):
    torch.manual_seed(0)
    enc = TextEncoder(tok.vocab_size, 12, width=16, depth=1, heads=2, embed_dim=8).eval()
    short = tok.encode(["a small red circle"])
    padded = torch.cat([short, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    torch.testing.assert_close(enc(short), enc(padded))
    with pytest.raises(DataError, match="context_length is 12"):
        enc(torch.ones(1, 13, dtype=torch.long))


def test_non_string_text_is_rejected(tok):
    with pytest.raises(DataError, match="text #1 is int"):
        tok.encode(["ok", 5])


def test_training_is_deterministic_across_processes():
    """The same texts give the same vocabulary and ids in a fresh interpreter (hash seeds differ)."""
    import sys

    from clirun import run_group

    code = (
        "from mmfusion.modalities.text import TextTokenizer as T;"
        "t = T.train(['a small red circle', 'is there a blue cross?', 'a large red square left of a circle'] * 3, 64, 16);"
        "print(sorted(t.tokenizer.get_vocab().items()), t.encode(['a red cross?']).tolist())"
    )
    runs = {run_group([sys.executable, "-c", code], cwd=None, timeout=60).stdout for _ in range(3)}
    assert len(runs) == 1, runs
