"""The synthetic world: determinism, disjoint splits, layout, captions, audio, video, VQA."""

import hashlib
import json
import re
import sys

import numpy as np
import pytest

from clirun import run_group
from mmfusion.data.synthetic import (
    BACKGROUND,
    COLOURS,
    DIRECTIONS,
    PITCH,
    RGB,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    SPLITS,
    TEMPLATES,
    VQA_ANSWERS,
    Obj,
    Scene,
    SyntheticWorld,
    WorldConfig,
    caption_for,
    describe_motion,
    make_split,
)

WORLD = SyntheticWorld(WorldConfig(seed=0))
ALL = ("image", "text", "audio", "video", "vqa")
SR = 16000

# ---- an independent parser of the caption templates ---------------------------------------------------------
OB = r"a ((?:small|large) (?:red|green|blue|yellow|purple|orange|white|cyan) (?:circle|square|triangle|diamond|cross))"
# (pattern, left-to-right order of the mentioned objects): order[k] = mention index of the k-th object from the left
PATTERNS = [
    (f"{OB}", (0,)),
    (f"there is {OB}", (0,)),
    (f"{OB} on a dark background", (0,)),
    (f"an image of {OB}", (0,)),
    (f"a picture showing {OB}", (0,)),
    (f"a single {OB[2:]}", (0,)),
    (f"{OB} to the left of {OB}", (0, 1)),
    (f"{OB} to the right of {OB}", (1, 0)),
    (f"there is {OB} on the left and {OB} on the right", (0, 1)),
    (f"{OB} on the right and {OB} on the left", (1, 0)),
    (f"from left to right: {OB} and {OB}", (0, 1)),
    (f"two shapes: {OB} and {OB}, left to right", (0, 1)),
    (f"from left to right: {OB}, {OB} and {OB}", (0, 1, 2)),
    (f"{OB} on the left, {OB} in the middle and {OB} on the right", (0, 1, 2)),
    (f"three shapes: {OB}, {OB} and {OB}, left to right", (0, 1, 2)),
    (f"{OB} between {OB} on the left and {OB} on the right", (1, 0, 2)),
    (f"{OB} on the right, {OB} in the middle and {OB} on the left", (2, 1, 0)),
    (f"{OB} to the left of {OB}, which is to the left of {OB}", (0, 1, 2)),
]


def parse_caption(text: str) -> tuple[int, tuple[tuple[str, ...], ...]]:
    """(pattern number, left-to-right key) of a caption; exactly one pattern must match the whole caption."""
    hits = [(i, m, order) for i, (p, order) in enumerate(PATTERNS) if (m := re.fullmatch(p, text))]
    assert len(hits) == 1, (text, [h[0] for h in hits])
    i, m, order = hits[0]
    mentioned = [tuple(g.split()) for g in m.groups()]
    return i, tuple(mentioned[k] for k in order)


def obj(shape, colour, size, x, y=0.5):
    return Obj(shape, colour, size, x, y)


def digest(sample: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(sample):
        v = sample[k]
        h.update(k.encode())
        h.update(v.tobytes() if isinstance(v, np.ndarray) else json.dumps(v, sort_keys=True).encode())
    return h.hexdigest()


# ---- determinism -------------------------------------------------------------------------------------------
def test_same_sample_twice_and_in_a_fresh_world_and_process():
    a = WORLD.sample("train", 11, ALL)
    assert digest(a) == digest(WORLD.sample("train", 11, ALL))
    assert digest(a) == digest(SyntheticWorld(WorldConfig(seed=0)).sample("train", 11, ALL))
    code = (
        "import hashlib, json, numpy as np\n"
        "from mmfusion.data.synthetic import SyntheticWorld\n"
        f"s = SyntheticWorld().sample('train', 11, {ALL!r})\n"
        "h = hashlib.sha256()\n"
        "for k in sorted(s):\n"
        "    v = s[k]; h.update(k.encode())\n"
        "    h.update(v.tobytes() if isinstance(v, np.ndarray) else json.dumps(v, sort_keys=True).encode())\n"
        "print(h.hexdigest())\n"
    )
    out = run_group([sys.executable, "-c", code], cwd=None, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == digest(a)


def test_a_different_seed_gives_different_data():
    other = SyntheticWorld(WorldConfig(seed=1))
    same = sum(WORLD.scene("train", i) == other.scene("train", i) for i in range(50))
    assert same == 0
    assert not np.array_equal(WORLD.sample("val", 0)["image"], other.sample("val", 0)["image"])


def test_extra_modalities_do_not_change_image_or_text():
    plain = WORLD.sample("val", 5)
    assert set(plain) == {"id", "scene", "scene_key", "image", "text"}
    rich = WORLD.sample("val", 5, ("audio", "video", "vqa", "text", "image"))
    assert np.array_equal(plain["image"], rich["image"]) and plain["text"] == rich["text"]
    assert set(rich) == {
        "id",
        "scene",
        "scene_key",
        "image",
        "text",
        "audio",
        "audio_sr",
        "video",
        "video_text",
        "vqa",
    }
    audio_only = WORLD.sample("val", 5, ("audio",))
    assert set(audio_only) == {"id", "scene", "scene_key", "audio", "audio_sr"}
    assert np.array_equal(audio_only["audio"], rich["audio"])
    with pytest.raises(ValueError, match="unknown modalities"):
        WORLD.sample("val", 5, ("image", "smell"))


def test_bad_split_name():
    with pytest.raises(ValueError, match="unknown split 'dev'; expected one of train, val, test"):
        WORLD.scene("dev", 0)
    with pytest.raises(ValueError, match="'validation'"):
        WORLD.sample("validation", 0)


# ---- splits ------------------------------------------------------------------------------------------------
def test_splits_are_disjoint_by_full_scene_record():
    records = {}
    for split, n in (("train", 2000), ("val", 500), ("test", 500)):
        scenes = [WORLD.scene(split, i) for i in range(n)]
        lo, hi = SPLITS[split]
        assert all(lo <= s.content_hash() % 100 < hi for s in scenes)
        records[split] = {json.dumps(s.to_dict(), sort_keys=True) for s in scenes}
        assert len(records[split]) > 0.97 * n  # scenes within a split rarely repeat
    assert not records["train"] & records["val"]
    assert not records["train"] & records["test"]
    assert not records["val"] & records["test"]


def test_candidate_scenes_fall_into_the_buckets_80_10_10():
    buckets = np.array(
        [WORLD._draw_scene(np.random.default_rng([0, 0, i, 0])).content_hash() % 100 for i in range(3000)]
    )
    frac = [np.mean(buckets < 80), np.mean((buckets >= 80) & (buckets < 90)), np.mean(buckets >= 90)]
    assert np.allclose(frac, [0.8, 0.1, 0.1], atol=0.03), frac


# ---- scenes ------------------------------------------------------------------------------------------------
def test_scene_layout():
    counts = np.zeros(4, int)
    for i in range(1500):
        s = WORLD.scene("train", i)
        n = len(s.objects)
        counts[n] += 1
        assert 1 <= n <= 3 and s.motion in DIRECTIONS
        assert len({(o.size, o.colour, o.shape) for o in s.objects}) == n  # no two identical objects
        for o in s.objects:
            h = SIZE_FRACTION[o.size] / 2
            assert h <= o.x <= 1 - h and h <= o.y <= 1 - h  # inside the frame
            assert (o.x * 64).is_integer() and (o.y * 64).is_integer()
        xs = sorted(o.x for o in s.objects)
        assert all(b - a >= 0.2 for a, b in zip(xs, xs[1:]))  # clearly distinct x-order
        for j, a in enumerate(s.objects):
            for b in s.objects[j + 1 :]:
                need = (SIZE_FRACTION[a.size] + SIZE_FRACTION[b.size]) / 2
                assert abs(a.x - b.x) >= need or abs(a.y - b.y) >= need  # bounding boxes never overlap
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert np.allclose(counts[1:] / counts.sum(), [0.5, 0.3, 0.2], atol=0.04)
    threes = SyntheticWorld(WorldConfig(object_count_probs=(0.0, 0.0, 1.0)))
    assert {len(threes.scene("test", i).objects) for i in range(30)} == {3}
    with pytest.raises(ValueError, match="object_count_probs"):
        SyntheticWorld(WorldConfig(object_count_probs=(0.5, 0.5, 0.5)))


def test_key_is_left_to_right_attributes_only():
    s = Scene((obj("square", "blue", "large", 0.8, 0.3), obj("circle", "red", "small", 0.2)), motion="up")
    assert s.key() == (("small", "red", "circle"), ("large", "blue", "square"))
    assert s.key_str() == "small red circle | large blue square"
    moved = Scene(
        (obj("square", "blue", "large", 0.7, 0.6), obj("circle", "red", "small", 0.1)), motion="left"
    )
    assert moved.key() == s.key() and moved.content_hash() != s.content_hash()
    sample = WORLD.sample("train", 3)
    assert sample["id"] == "train-0000003"
    assert sample["scene_key"] == Scene.from_dict(sample["scene"]).key_str()


# ---- captions ----------------------------------------------------------------------------------------------
def test_every_template_parses_back_to_the_key():
    scenes = [
        Scene((obj("circle", "red", "small", 0.5),)),
        Scene((obj("square", "blue", "large", 0.8), obj("circle", "red", "small", 0.2))),
        Scene(
            (
                obj("cross", "white", "small", 0.8),
                obj("circle", "red", "small", 0.2),
                obj("square", "blue", "large", 0.5),
            )
        ),
    ]
    for s in scenes:
        for t in range(len(TEMPLATES[len(s.objects)])):
            assert parse_caption(caption_for(s, t))[1] == s.key()
    assert caption_for(scenes[1], 1) == "a large blue square to the right of a small red circle"
    assert (
        caption_for(scenes[2], 0)
        == "from left to right: a small red circle, a large blue square and a small white cross"
    )


def test_sampled_captions_state_exactly_the_key():
    used = set()
    for i in range(400):
        s = WORLD.sample("train", i, ("text",))
        pattern, key = parse_caption(s["text"])
        used.add(pattern)
        assert key == Scene.from_dict(s["scene"]).key(), s["text"]
    assert used == set(range(len(PATTERNS)))  # every template is in use


def test_describe_motion():
    s = Scene((obj("circle", "red", "small", 0.8), obj("square", "blue", "large", 0.2)), motion="left")
    assert describe_motion(s) == "a small red circle moving left"
    v = WORLD.sample("test", 4, ("video",))
    assert v["video_text"] == describe_motion(Scene.from_dict(v["scene"]))


# ---- image -------------------------------------------------------------------------------------------------
def test_image_pixels():
    s = Scene((obj("square", "red", "large", 0.25), obj("circle", "cyan", "small", 0.75)))
    img = WORLD.render_image(s)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 8]) == RGB["red"] and tuple(img[16, 24]) == RGB["cyan"]  # object centres
    assert tuple(img[1, 1]) == BACKGROUND and tuple(img[16, 16]) == BACKGROUND
    noisy = WORLD.render_image(s, np.random.default_rng(0))
    diff = noisy.astype(int) - img.astype(int)
    assert 0 < np.abs(diff).max() <= WORLD.config.noise
    big = SyntheticWorld(WorldConfig(image_size=64)).render_image(s)
    assert big.shape == (64, 64, 3) and tuple(big[32, 16]) == RGB["red"]


def test_make_split():
    samples = make_split(WORLD, "test", 3)
    assert [s["id"] for s in samples] == ["test-0000000", "test-0000001", "test-0000002"]
    img = samples[0]["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert img.max() > 150 and np.median(img) < 40  # bright objects on a dark background


# ---- audio -------------------------------------------------------------------------------------------------
def _peak(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[spec.argmax()])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_audio_format():
    s = WORLD.sample("train", 2, ("audio",))
    a = s["audio"]
    assert s["audio_sr"] == SR and a.dtype == np.float32 and a.shape == (8000,)
    assert np.abs(a).max() <= 1.0 and np.abs(a).max() > 0.1


def test_audio_colour_is_pitch_and_size_is_loudness():
    for shape in SHAPES:
        peaks = []
        for colour in COLOURS:
            small = WORLD.render_audio(Scene((obj(shape, colour, "small", 0.5),)))
            large = WORLD.render_audio(Scene((obj(shape, colour, "large", 0.5),)))
            assert abs(_peak(large) - PITCH[colour]) <= 2.0, (shape, colour)  # 2 Hz FFT bins
            peaks.append(_peak(large))
            assert _rms(large) / _rms(small) == pytest.approx(0.8 / 0.3, rel=0.01)
        assert len(set(peaks)) == len(COLOURS)
    # three objects: one equal slot each, left to right
    s = Scene(
        (
            obj("cross", "cyan", "small", 0.8),
            obj("circle", "red", "large", 0.2),
            obj("square", "white", "large", 0.5),
        )
    )
    a = WORLD.render_audio(s)
    slots = a[: 3 * (8000 // 3)].reshape(3, -1)
    assert [_peak(x) for x in slots] == pytest.approx([PITCH["red"], PITCH["white"], PITCH["cyan"]], abs=3.1)
    assert _rms(slots[0]) > 2 * _rms(slots[2])


# ---- video -------------------------------------------------------------------------------------------------
def _centroid(frame: np.ndarray, colour: str) -> np.ndarray:
    mask = np.abs(frame.astype(int) - RGB[colour]).sum(axis=2) < 60
    return np.argwhere(mask).mean(axis=0)[::-1]  # (x, y)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_video_moves_the_first_object_in_its_direction(direction):
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
    # the mover starts near an edge: the trajectory is shifted inside the frame, never stalls
    s = Scene(
        (obj("square", "white", "small", 0.2, 0.8), obj("circle", "red", "large", 0.75, 0.25)),
        motion=direction,
    )
    video = WORLD.render_video(s, np.random.default_rng(1))
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    c = np.array([_centroid(f, "white") for f in video])
    moves = np.diff(c, axis=0) @ np.array(step, dtype=float)
    assert (moves > 0).all()
    assert moves.sum() == pytest.approx(0.35 * 32, abs=1.0)  # total travel ~0.35 of the side
    other = np.diff(c, axis=0) @ np.array(step[::-1], dtype=float)
    assert np.abs(other).max() < 0.3  # no sideways drift
    still = np.array([_centroid(f, "red") for f in video])
    assert np.abs(still - still[0]).max() < 0.3  # the other object stays put


# ---- VQA ---------------------------------------------------------------------------------------------------
def test_vqa_on_a_hand_built_scene():
    s = Scene(
        (
            obj("square", "blue", "large", 0.6, 0.4),
            obj("circle", "red", "small", 0.2),
            obj("cross", "red", "large", 0.9),
        )
    )
    truth = {
        "how many objects are there?": "three",
        "what colour is the circle?": "red",
        "what colour is the square?": "blue",
        "what colour is the cross?": "red",
        "what shape is the blue object?": "square",
        "what is left of the red circle?": "nothing",
        "what is left of the blue square?": "circle",
        "what is left of the red cross?": "square",
        "what size is the red circle?": "small",
        "what size is the blue square?": "large",
        "what size is the red cross?": "large",
        "is there a red circle?": "yes",
        "is there a blue square?": "yes",
        "is there a red cross?": "yes",
    }
    rng = np.random.default_rng(0)
    asked, answers = set(), []
    for _ in range(300):
        qa = WORLD.vqa(s, rng)
        assert len(qa) == 6  # one per family; "what shape is the red object?" is ambiguous, never asked
        for q, a in qa:
            assert a in VQA_ANSWERS
            if q.startswith("is there"):
                answers.append(a)
                if q not in truth:
                    assert a == "no", q
                    continue
            assert truth[q] == a, q
            asked.add(q)
    assert asked == set(truth)
    assert 0.4 < answers.count("yes") / len(answers) < 0.6  # balanced yes/no


def test_vqa_skips_ambiguous_references():
    s = Scene((obj("circle", "red", "small", 0.2), obj("circle", "red", "large", 0.8)))
    rng = np.random.default_rng(3)
    for _ in range(50):
        qs = dict(WORLD.vqa(s, rng))
        assert qs["how many objects are there?"] == "two"
        assert not any(q.startswith(("what colour", "what shape", "what size", "what is left")) for q in qs)
    one = Scene((obj("triangle", "orange", "small", 0.5),))
    qa = dict(WORLD.vqa(one, np.random.default_rng(0)))
    assert qa["what is left of the orange triangle?"] == "nothing"
    assert (
        qa["what colour is the triangle?"] == "orange"
        and qa["what shape is the orange object?"] == "triangle"
    )


def test_vqa_answers_in_vocabulary():
    assert len(VQA_ANSWERS) == len(set(VQA_ANSWERS)) == 21
    for i in range(200):
        for qa in WORLD.sample("train", i, ("vqa",))["vqa"]:
            assert set(qa) == {"question", "answer"} and qa["answer"] in VQA_ANSWERS
            assert " " not in qa["answer"]
    assert set(SIZES) <= set(VQA_ANSWERS)
