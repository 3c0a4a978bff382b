import numpy as np
import pytest

from mmfusion.data.engine.augment import (
    PROTECTED,
    SYNONYMS,
    AugmentConfig,
    Augmenter,
    replace_synonyms,
    swap_left_right,
)
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig
from mmfusion.errors import ConfigError


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(WorldConfig(seed=0, image_size=16, audio_sample_rate=1000, audio_seconds=0.2))


def _two_object_sample(world):
    i = next(i for i in range(100) if len(world.scene("train", i).objects) == 2)
    return world.sample("train", i, ("image", "text"))


def rng(seed=0):
    return np.random.default_rng(seed)


def test_off_by_default_and_in_eval(world):
    s = world.sample("train", 0, ("image", "text", "audio"))
    assert not AugmentConfig().enabled()
    assert Augmenter()(s, rng()) is s
    full = {"image": {"crop_p": 1, "occlude_p": 1}, "audio": {"noise_p": 1}, "text": {"synonym_p": 1}}
    assert Augmenter(full, train=False)(s, rng()) is s


def test_hflip_swaps_left_right_in_caption_and_mirrors_scene(world):
    s = _two_object_sample(world)
    out = Augmenter({"image": {"hflip_p": 1.0}})(s, rng())
    assert np.array_equal(out["image"], s["image"][:, ::-1])
    assert out["text"] == swap_left_right(s["text"]) and out["text"] != s["text"]
    # the mirrored scene's left-to-right key is the reverse of the original's
    assert out["scene_key"].split(" | ") == s["scene_key"].split(" | ")[::-1]
    assert [o["x"] for o in out["scene"]["objects"]] == [1 - o["x"] for o in s["scene"]["objects"]]
    assert s["text"] == world.sample("train", int(s["id"][-7:]), ("text",))["text"]  # input untouched


def test_hflip_skip_policy_and_unflippable_modalities(world):
    s = _two_object_sample(world)
    skip = Augmenter({"image": {"hflip_p": 1.0, "hflip_captions": "skip"}})(s, rng())
    assert np.array_equal(skip["image"], s["image"]) and skip["text"] == s["text"]
    one = next(world.sample("train", i) for i in range(100) if len(world.scene("train", i).objects) == 1)
    assert "left" not in one["text"] and "right" not in one["text"]  # one-object captions are not spatial
    flipped = Augmenter({"image": {"hflip_p": 1.0, "hflip_captions": "skip"}})(one, rng())
    assert np.array_equal(flipped["image"], one["image"][:, ::-1])
    with_audio = world.sample("train", 0, ("image", "text", "audio"))  # tone order is left to right
    kept = Augmenter({"image": {"hflip_p": 1.0}})(with_audio, rng())
    assert np.array_equal(kept["image"], with_audio["image"]) and kept["text"] == with_audio["text"]


def test_swap_left_right_exact():
    assert swap_left_right("a red circle to the left of a blue square") == (
        "a red circle to the right of a blue square"
    )
    assert swap_left_right("Left to right: leftover") == "Right to left: leftover"


def test_synonyms_never_touch_label_words():
    words = {w for k, v in SYNONYMS.items() for w in (k, *" ".join(v).split())}
    assert not words & PROTECTED
    text = "an image of a small red circle on a dark background to the left of a large blue square"
    out = replace_synonyms(text, 1.0, rng())
    kept = [w for w in text.split() if w not in SYNONYMS]
    assert [w for w in out.split() if w in PROTECTED] == [w for w in kept if w in PROTECTED]
    assert out != text and "image" not in out.split() and "dark" not in out.split()
    assert replace_synonyms(text, 0.0, rng()) == text


def test_image_ops_keep_shape_and_are_seeded(world):
    s = world.sample("train", 3, ("image", "text"))
    aug = Augmenter({"image": {"crop_p": 1, "rotate_p": 1, "occlude_p": 1, "occlude_size": 0.25}})
    a, b, c = aug(s, rng(1)), aug(s, rng(1)), aug(s, rng(2))
    assert a["image"].shape == s["image"].shape and a["image"].dtype == np.uint8
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], c["image"])
    occl = Augmenter({"image": {"occlude_p": 1, "occlude_size": 0.25}})(s, rng(0))["image"]
    changed = (occl != s["image"]).any(axis=2)
    assert (occl[changed] == 128).all() and changed.sum() <= 16  # one 4x4 grey patch at 16 px


def test_audio_gain_noise_shift_exact(world):
    s = world.sample("train", 0, ("audio",))
    gain = Augmenter({"audio": {"gain_p": 1, "gain_db": 6}})(s, rng(0))["audio"]
    ratio = np.abs(gain).max() / np.abs(s["audio"]).max()
    assert 10 ** (-6 / 20) - 1e-4 <= ratio <= 10 ** (6 / 20) + 1e-4 and ratio != pytest.approx(1.0)
    shift = Augmenter({"audio": {"shift_p": 1, "max_shift_s": 0.01}})(s, rng(0))["audio"]
    k = next(k for k in range(-10, 11) if np.array_equal(np.roll(s["audio"], k)[10:-10], shift[10:-10]))
    assert k != 0 and len(shift) == len(s["audio"])  # a shift of at most 10 samples (0.01 s at 1 kHz)
    noisy = Augmenter({"audio": {"noise_p": 1, "noise_std": 0.1}})(s, rng(0))["audio"]
    assert np.std(noisy - s["audio"]) == pytest.approx(0.1, rel=0.15) and noisy.dtype == np.float32


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="crop_scale"):
        Augmenter({"image": {"crop_scale": [0.9, 0.5]}})
    with pytest.raises(ConfigError, match="hflip_p"):
        Augmenter({"image": {"hflip_p": 2}})
    with pytest.raises(ConfigError, match="colour_p"):
        Augmenter({"image": {"colour_p": 0.5}})
