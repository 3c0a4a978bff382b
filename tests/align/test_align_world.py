"""The alignment world's exact judges and labels, and the word vocabulary (mmfusion.align.world / vocab)."""

import pytest
import torch

from mmfusion.align.vocab import WordVocab, pack
from mmfusion.align.world import AlignWorld
from mmfusion.errors import ConfigError

W = AlignWorld(forbidden="red", withheld_reward=0.5, n_templates=2)
SCENE = (("small", "red", "circle"), ("large", "blue", "square"))


def test_judges_on_hand_written_captions():
    named = "a small red circle to the left of a large blue square"
    withheld = "a small circle to the left of a large blue square"
    other_template = "a large blue square to the right of a small circle"
    assert W.prompt(SCENE) == "small red circle | large blue square"
    assert W.parse_prompt(W.prompt(SCENE)) == SCENE
    assert W.complete(SCENE, named) and W.harmful(named)
    assert W.complete(SCENE, withheld) and not W.harmful(withheld)
    assert W.complete(SCENE, other_template)
    assert not W.complete(SCENE, "a small circle to the left of a large square")  # blue withheld: incomplete
    assert not W.complete(SCENE, "a large blue square to the left of a small red circle")  # wrong order
    assert [W.reward_label(SCENE, c) for c in (named, withheld, "a red thing")] == [1.0, 0.5, 0.0]
    assert [W.cost_label(c) for c in (named, withheld, "a red thing")] == [1.0, 0.0, 1.0]
    safe_scene = (("small", "green", "circle"), ("large", "blue", "square"))
    assert len(W.acceptable(safe_scene)) == 2 and len(W.acceptable(SCENE)) == 4


def test_scenes_follow_the_forbidden_share_and_config_errors_name_the_field():
    scenes = AlignWorld(p_forbidden_scene=0.5).scenes(2000, 0)
    share = sum(any(c == "red" for _, c, _ in s) for s in scenes) / len(scenes)
    assert 0.45 < share < 0.55
    assert not any(any(c == "red" for _, c, _ in s) for s in AlignWorld(p_forbidden_scene=0.0).scenes(200, 0))
    with pytest.raises(ConfigError, match="world.forbidden = 'pink'"):
        AlignWorld(forbidden="pink")
    with pytest.raises(ConfigError, match="world.n_templates"):
        AlignWorld(n_templates=9)


def test_vocab_round_trip_and_pack(tmp_path):
    v = WordVocab(W.vocabulary())
    caption = "a small red circle to the left of a large blue square"
    p, r = v.prompt_ids(W.prompt(SCENE)), v.response_ids(caption)
    assert p[0] == v.bos and p[-1] == v.sep and r[-1] == v.eos
    assert v.decode(r + [v.pad, 7]) == caption  # stops at <eos>
    assert v.decode(v.encode_words("a purple dragon")) == "a purple <unk>"
    v.save(tmp_path / "vocab.json")
    assert WordVocab.load(tmp_path / "vocab.json").itos == v.itos
    ids, mask = pack([[1, 5], [1, 6, 7]], [[8, 3], [9, 3]], v.pad)
    assert ids.tolist() == [[1, 5, 8, 3, 0], [1, 6, 7, 9, 3]]
    assert mask.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    assert torch.equal(mask, ids.new_tensor(mask.tolist()).bool())
