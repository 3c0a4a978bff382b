"""Sharded checkpoints: the SHA-256 manifest is verified before torch's DCP reader (which unpickles `.metadata`)
opens any file. One process saves here; tests/train/test_dcp.py covers 2-rank saves and resharding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader

from mmfusion.errors import CheckpointError
from mmfusion.train.checkpoint import MANIFEST, save_checkpoint
from mmfusion.train.dcp import consolidate, load_sharded, save_sharded


def fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    F.mse_loss(model(torch.randn(3, 4, generator=g)), torch.randn(3, 2, generator=g)).backward()
    opt.step()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    """Checkpoints after steps 1 and 2 of one seeded run, and the model state at each."""
    root = tmp_path_factory.mktemp("dcp_manifest") / "ckpts"
    model, opt = fresh(0)
    states = {}
    for s in (1, 2):
        step(model, opt, s)
        save_sharded(root, s, model, opt, extra={"tag": f"s{s}"})
        states[s] = {k: v.clone() for k, v in model.state_dict().items()}
    return root, states


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    shutil.copytree(saved[0], tmp_path / "ckpts")
    return tmp_path / "ckpts"


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of the checkpoint folders torch's DCP reader opens (read_metadata unpickles `.metadata`)."""
    opened: list[str] = []
    for name in ("read_metadata", "read_data"):
        original = getattr(FileSystemReader, name)

        def record(self, *a, _original=original, **k):
            opened.append(Path(str(self.path)).name)
            return _original(self, *a, **k)

        monkeypatch.setattr(FileSystemReader, name, record)
    return opened


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_the_reader_may_open(saved):
    import json

    folder = saved[0] / "step-00000002"
    listed = json.loads((folder / MANIFEST).read_text())["sha256"]
    assert sorted(listed) == sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert {".metadata", "__0_0.distcp", "state.json"} <= set(listed)


def test_a_good_checkpoint_loads_and_the_reader_is_used(saved, reads):
    root, states = saved
    model, opt = fresh(9)
    ckpt, extra = load_sharded(root, model, opt)
    assert ckpt.step == 2 and extra["tag"] == "s2" and extra["world_size"] == 1
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items())
    assert reads and set(reads) == {"step-00000002"}  # the recorder does see the reader


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp", "state.json"])
def test_a_flipped_byte_is_refused_before_the_reader_opens_anything(copy, reads, name, saved):
    flip_byte(copy / "step-00000002" / name)
    model, opt = fresh(9)
    with pytest.raises(CheckpointError, match=f"damaged \\({name} does not match its checksum\\)"):
        load_sharded(copy / "step-00000002", model, opt)  # the folder by name: an error naming the file
    assert reads == []
    with pytest.raises(CheckpointError, match=f"{name} does not match its checksum"):
        consolidate(copy / "step-00000002")
    assert reads == []
    messages: list[str] = []
    ckpt, extra = load_sharded(copy, model, opt, log=messages.append)  # the directory: fall back to step 1
    assert ckpt.step == 1 and extra["tag"] == "s1"
    assert messages == [
        f"checkpoint {copy / 'step-00000002'} is damaged ({name} does not match its checksum); "
        "falling back to the previous one"
    ]
    assert set(reads) == {"step-00000001"}
    assert all(torch.equal(v, saved[1][1][k]) for k, v in model.state_dict().items())


def test_missing_and_unlisted_files_are_refused(copy, reads):
    folder = copy / "step-00000002"
    (folder / "__0_0.distcp").unlink()
    model, opt = fresh(9)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is missing"):
        load_sharded(folder, model, opt)
    shutil.copy(copy / "step-00000001" / "__0_0.distcp", folder / "__0_0.distcp")  # a file from elsewhere
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp does not match its checksum"):
        load_sharded(folder, model, opt)
    (copy / "step-00000001" / "__1_0.distcp").write_bytes(b"not listed")
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is not in MANIFEST\.json"):
        load_sharded(copy / "step-00000001", model, opt)
    assert reads == []


def test_a_metadata_file_dropped_into_a_plain_checkpoint_is_not_unpickled(tmp_path, reads):
    """A plain checkpoint's manifest verifies its own files; a `.metadata` put beside them must not be read."""
    model, opt = fresh(0)
    step(model, opt, 1)
    folder = save_checkpoint(tmp_path, 1, model.state_dict(), opt.state_dict(), {}, keep=1)
    (folder / ".metadata").write_bytes(b"\x80\x04N.")  # a pickle (of None)
    with pytest.raises(CheckpointError, match=r"\.metadata is not in MANIFEST\.json"):
        load_sharded(folder, model, opt)
    messages: list[str] = []
    assert load_sharded(tmp_path, model, opt, log=messages.append) is None
    assert ".metadata is not in MANIFEST.json" in messages[0]
    assert reads == []
