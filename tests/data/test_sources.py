import io
import json
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from torch.utils.data import DataLoader

from mmfusion.data.sources import (
    REASONS,
    JsonlDataset,
    SkippedSample,
    WebDatasetSource,
    count_samples,
    open_source,
)
from mmfusion.data.synthetic import SyntheticWorld, WorldConfig, make_split
from mmfusion.data.writers import write_jsonl, write_webdataset
from mmfusion.errors import ConfigError, DataError

ALL = ("image", "text", "audio", "video", "vqa")


@pytest.fixture(scope="module")
def samples():
    out = make_split(SyntheticWorld(WorldConfig(seed=0)), "test", 5, modalities=ALL)
    out[0]["meta"] = {"source": "web", "score": 0.5}
    return out


def assert_same(a, b):
    for k in ("id", "text", "scene", "scene_key", "vqa", "video_text", "audio_sr"):
        assert a[k] == b[k], k
    assert a.get("meta") == b.get("meta")
    assert b["image"].dtype == np.uint8 and np.array_equal(a["image"], b["image"])
    assert b["video"].dtype == np.uint8 and np.array_equal(a["video"], b["video"])
    assert b["audio"].dtype == np.float32 and np.abs(a["audio"] - b["audio"]).max() <= 1 / 32767


def relink(tar_path, edit):
    """Rewrite a tar with edit(members: dict name -> bytes) applied."""
    with tarfile.open(tar_path) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    edit(members)
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def ids_of(items):
    return [x.id if isinstance(x, SkippedSample) else x["id"] for x in items]


def test_jsonl_round_trip(samples, tmp_path):
    path = write_jsonl(samples, tmp_path, "test")
    ds = JsonlDataset(path)
    assert path == tmp_path / "test.jsonl" and len(ds) == 5
    assert ds.ids() == [s["id"] for s in samples] and ds.texts() == [s["text"] for s in samples]
    for s, r in zip(samples, ds):
        assert_same(s, r)
    only = JsonlDataset(path, modalities=("text",))[0]
    assert "image" not in only and only["text"] == samples[0]["text"] and only["scene"] == samples[0]["scene"]


def test_webdataset_round_trip_without_warnings(samples, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shards = write_webdataset(samples, tmp_path, "test", samples_per_shard=2)
        assert [p.name for p in shards] == ["test-000000.tar", "test-000001.tar", "test-000002.tar"]
        pattern = str(tmp_path / "test-{000000..000002}.tar")
        assert count_samples(pattern) == count_samples(tmp_path) == 5
        for path in (pattern, str(tmp_path)):
            got = list(open_source("webdataset", path))
            assert len(got) == 5
            for s, r in zip(samples, got):
                assert_same(s, r)
        assert ids_of(WebDatasetSource(shards[0])) == [s["id"] for s in samples[:2]]
        assert list(WebDatasetSource(tmp_path).texts()) == [s["text"] for s in samples]


def per_rank_ids(path, world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    out = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        out.append(ids_of(WebDatasetSource(path, modalities=("text",))))
    return out


def test_webdataset_split_over_workers_and_ranks(samples, tmp_path, monkeypatch):
    uneven, even = tmp_path / "uneven", tmp_path / "even"
    write_webdataset(samples * 2, uneven, "s", samples_per_shard=3)  # 10 samples in shards of 3, 3, 3, 1
    write_webdataset(samples[:4] * 2, even, "s", samples_per_shard=2)  # 8 samples in 4 shards of 2
    expected = sorted(s["id"] for s in samples * 2)
    loader = DataLoader(WebDatasetSource(uneven, modalities=("text",)), batch_size=None, num_workers=2)
    assert sorted(ids_of(loader)) == expected
    for path, world in ((uneven, 2), (uneven, 3), (even, 2)):
        whole = sorted(ids_of(WebDatasetSource(path, modalities=("text",))))
        per_rank = per_rank_ids(path, world, monkeypatch)  # whole shards only for `even`
        monkeypatch.delenv("RANK")
        assert sorted(sum(per_rank, [])) == whole
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    first_two = ids_of(WebDatasetSource([even / "s-000000.tar", even / "s-000002.tar"]))
    assert per_rank_ids(even, 2, monkeypatch)[0] == first_two


def test_webdataset_shuffle_is_seeded_per_epoch(samples, tmp_path):
    write_webdataset(samples * 2, tmp_path, "s", samples_per_shard=2)
    src = WebDatasetSource(tmp_path, modalities=("text",), shuffle=4, seed=3)
    first, again = ids_of(src), ids_of(src)
    src.set_epoch(1)
    second = ids_of(src)
    assert first == again and first != second and sorted(first) == sorted(second)


def test_image_modes_become_rgb(tmp_path):
    px = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    Image.fromarray(px, mode="L").save(tmp_path / "grey.png")
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    rgba[0, 1] = (200, 100, 50, 0)  # fully transparent: composited on black
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (2, 2))
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 7, 8, 9])
    pal.putdata([0, 1, 2, 3])
    pal.save(tmp_path / "pal.png")
    Image.fromarray(px.astype(np.uint16) * 256).save(tmp_path / "deep.png")  # 16-bit greyscale
    Image.new("RGB", (7, 3), (1, 2, 3)).save(tmp_path / "odd.png")
    names = ("grey", "rgba", "pal", "deep", "odd")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"image": f"{n}.png"}) for n in names))
    out = dict(zip(names, (s["image"] for s in JsonlDataset(tmp_path / "m.jsonl"))))
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in out.values())
    assert np.array_equal(out["grey"], np.repeat(px[..., None], 3, axis=2))
    assert out["rgba"][0, 0].tolist() == [10, 20, 30] and out["rgba"][0, 1].tolist() == [0, 0, 0]
    assert out["pal"].reshape(4, 3).tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [7, 8, 9]]
    assert np.array_equal(out["deep"][..., 0], px) and out["deep"].shape == (2, 2, 3)
    assert out["odd"].shape == (3, 7, 3) and (out["odd"] == [1, 2, 3]).all()


@pytest.fixture()
def broken(tmp_path):
    """train.jsonl: 3 valid lines and one line per bad-sample reason (in REASONS order, blank line 5)."""
    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "ok.png")
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    (tmp_path / "trunc.png").write_bytes((tmp_path / "noise.png").read_bytes()[:300])
    sf.write(tmp_path / "ok.wav", np.zeros(64, np.float32), 8000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEnot audio at all")
    np.save(tmp_path / "ok.npy", np.zeros((2, 4, 4, 3), np.uint8))
    np.save(tmp_path / "flat.npy", np.zeros((4, 4), np.uint8))

    def line(**kw):
        rec = {"image": "ok.png", "text": "x", "audio": "ok.wav", "video": "ok.npy", **kw}
        return json.dumps({k: v for k, v in rec.items() if v is not None})

    lines = [
        line(id="good-1"),
        "{not json",
        line(text=5),
        line(image="photos/missing.png"),
        "",
        line(image="trunc.png"),
        line(audio="bad.wav"),
        line(video="flat.npy"),
        line(audio=None),
        line(id="good-2", source="web"),
        line(id="good-3"),
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "train.jsonl"


def test_each_bad_sample_reason_once_and_nothing_valid_lost(broken):
    ds = JsonlDataset(broken, modalities=("image", "text", "audio", "video"))
    items = list(ds)
    assert len(items) == 10  # blank line ignored, bad JSON kept as an entry
    skipped = [x for x in items if isinstance(x, SkippedSample)]
    assert Counter(x.reason for x in skipped) == Counter(r for r in REASONS if r != "corrupt_shard")
    assert [x.id for x in skipped if x.reason == "bad_json"] == ["train-2"]
    assert next(x for x in skipped if x.reason == "missing_file").detail.endswith(
        "line 4: field 'image': file photos/missing.png not found"
    )
    good = [x for x in items if isinstance(x, dict)]
    assert [g["id"] for g in good] == ["good-1", "good-2", "good-3"]
    assert good[1]["meta"] == {"source": "web"} and good[0]["audio_sr"] == 8000
    every = list(JsonlDataset(broken))  # modalities present in each line: nothing is "missing"
    assert sum(isinstance(x, dict) for x in every) == 4


def test_wrong_field_types(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    bad = [
        {"image": ["ok.png"]},
        {"image": "ok.png", "id": 3},
        {"image": "ok.png", "scene": "x"},
        {"image": "ok.png", "vqa": [{"question": "q"}]},
        {"text": {"a": 1}},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(b) for b in bad))
    got = list(JsonlDataset(tmp_path / "m.jsonl"))
    assert [g.reason for g in got] == ["wrong_field_type"] * 5
    assert [g.detail.split(": ")[1] for g in got] == [
        "field 'image'",
        "field 'id'",
        "field 'scene'",
        "field 'vqa'",
        "field 'text'",
    ]


def test_fail_mode_names_file_line_and_field(broken):
    with pytest.raises(DataError, match=r"train\.jsonl line 2: invalid JSON"):
        JsonlDataset(broken, on_error="fail")
    lines = broken.read_text().splitlines()
    broken.write_text("\n".join(lines[:1] + lines[2:]))
    ds = JsonlDataset(broken, on_error="fail")
    assert ds[0]["id"] == "good-1"
    with pytest.raises(
        DataError, match=r"train\.jsonl line 2: field 'text': expected a string, got a number"
    ):
        ds[1]
    with pytest.raises(
        DataError, match=r"train\.jsonl line 3: field 'image': file photos/missing\.png not found"
    ):
        ds[2]
    with pytest.raises(ConfigError):
        JsonlDataset(broken, on_error="ignore")


def test_video_frames_folder_and_multichannel_audio(tmp_path):
    (tmp_path / "clip").mkdir()
    for k in (2, 0, 1):
        Image.new("RGB", (5, 4), (k * 50, 0, 0)).save(tmp_path / "clip" / f"{k:03d}.png")
    channels = np.stack([np.full(100, 0.5), np.full(100, -0.25), np.full(100, 0.125)], axis=1)
    sf.write(tmp_path / "s.flac", channels, 8000, subtype="PCM_16")
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "clip", "audio": "s.flac"}))
    s = JsonlDataset(tmp_path / "m.jsonl")[0]
    assert s["video"].shape == (3, 4, 5, 3) and s["video"].dtype == np.uint8
    assert s["video"][:, 0, 0, 0].tolist() == [0, 50, 100]
    assert s["audio"].shape == (100,) and s["audio"].dtype == np.float32 and s["audio_sr"] == 8000
    assert np.allclose(s["audio"], 0.125, atol=1e-4)


def test_webdataset_corrupt_member_and_shard(samples, tmp_path):
    shards = write_webdataset(samples[:4], tmp_path, "w", samples_per_shard=2)

    def break_first_png(members):
        name = next(n for n in members if n.endswith(".png"))
        members[name] = members[name][:30]

    relink(shards[0], break_first_png)
    got = list(WebDatasetSource(tmp_path, modalities=("image", "text")))
    assert isinstance(got[0], SkippedSample) and got[0].reason == "corrupt_image"
    assert got[0].id == samples[0]["id"] and all(isinstance(g, dict) for g in got[1:]) and len(got) == 4
    with pytest.raises(DataError, match=r"w-000000\.tar key 000000000: field 'image'"):
        list(WebDatasetSource(shards[0], on_error="fail"))
    shards[1].write_bytes(shards[1].read_bytes()[:1500])  # truncated shard
    got = list(WebDatasetSource(tmp_path))
    bad = [g for g in got if isinstance(g, SkippedSample)]
    assert [b.reason for b in bad] == ["corrupt_image", "corrupt_shard"] and bad[1].id.endswith(
        "w-000001.tar"
    )
    assert ids_of(got)[1] == samples[1]["id"]
    with tarfile.open(shards[0]) as tar:
        cut = tar.getmembers()[1].offset + 100  # inside a member header: tarfile itself stops silently
    shards[0].write_bytes(shards[0].read_bytes()[:cut])
    got = list(WebDatasetSource(shards[0]))
    assert got[-1].reason == "corrupt_shard" and "truncated" in got[-1].detail


def test_open_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl not found"):
        open_source("jsonl", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"x-000000\.tar not found"):
        open_source("webdataset", str(tmp_path / "x-{000000..000001}.tar"))
    with pytest.raises(DataError, match="no .tar shards"):
        open_source("webdataset", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown data source kind 'csv'"):
        open_source("csv", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown modalities"):
        JsonlDataset(tmp_path, modalities=("smell",))
