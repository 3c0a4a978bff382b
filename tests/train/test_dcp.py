"""S3: sharded checkpoints saved by 2 ranks (FSDP2, tensor parallel) load bitwise at 1 and 3 ranks."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mmfusion.errors import CheckpointError
from mmfusion.layers import Transformer
from mmfusion.train.dcp import consolidate, load_sharded, save_sharded
from mmfusion.train.parallel import ParallelConfig, apply_parallelism, build_mesh, launch_local

HERE = Path(__file__)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.body = Transformer(32, 2, 4)
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.body(self.inp(x))).squeeze(-1).mean(-1)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 6, 8, generator=g), torch.randn(4, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}{k}/")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}{i}/")
    else:
        yield prefix, obj


def assert_bitwise(a: dict, b: dict) -> None:
    fa, fb = dict(flat(a)), dict(flat(b))
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == fb[k].dtype and torch.equal(v, fb[k]), k
        else:
            assert v == fb[k], k


def fresh(seed: int = 5) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Toy()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


# ------------------------------------------------------------------------------------------ workers


def _init() -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    return dist.get_rank()


def worker_save(root: Path) -> None:
    """FSDP2 at 2 ranks: checkpoints after steps 1 and 2; tensor parallel at 2 ranks: one after step 1."""
    import torch.distributed as dist

    rank = _init()
    for mode, cfg in (
        ("fsdp", ParallelConfig(fsdp={"enabled": True})),
        ("tp", ParallelConfig(tensor={"size": 2})),
    ):
        model, _ = fresh(0)
        model = apply_parallelism(model, cfg, build_mesh(cfg))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in (1, 2) if mode == "fsdp" else (1,):
            train(model, opt, 1, seed=step + (rank * 100 if mode == "fsdp" else 0))  # TP: same batch
            save_sharded(root / mode, step, model, opt, extra={"mode": mode})
        ref = full_state(model, opt)
        if rank == 0:
            torch.save(ref, root / f"{mode}-ref.pt")
    dist.destroy_process_group()


def worker_load(root: Path) -> None:
    """FSDP2 at this world size (3): load the newest checkpoint saved at 2 ranks, gather, compare."""
    import torch.distributed as dist

    rank = _init()
    cfg = ParallelConfig(fsdp={"enabled": True})
    model, _ = fresh()
    model = apply_parallelism(model, cfg, build_mesh(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt, extra = load_sharded(root / "fsdp", model, opt)
    got = full_state(model, opt)
    if rank == 0:
        assert ckpt.step == 2 and extra["world_size"] == 2
        assert_bitwise(got, torch.load(root / "fsdp-ref.pt", weights_only=False))
        (root / "load3.ok").write_text("ok")
    train(model, opt, 1, seed=7)  # the loaded state trains on
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dcp")
    launch_local([str(HERE), "save", str(root)], 2, timeout_s=100)
    return root


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fsdp", "tp"])
def test_saved_at_two_ranks_loads_bitwise_at_one(saved, mode):
    ckpts = sorted(p.name for p in (saved / mode).iterdir())
    assert ckpts == (["step-00000001", "step-00000002"] if mode == "fsdp" else ["step-00000001"])
    model, opt = fresh()
    ckpt, extra = load_sharded(saved / mode, model, opt)
    assert extra["mode"] == mode and ckpt.step == len(ckpts)
    assert_bitwise(full_state(model, opt), torch.load(saved / f"{mode}-ref.pt", weights_only=False))


@pytest.mark.timeout(120)
def test_saved_at_two_ranks_loads_bitwise_at_three(saved):
    launch_local([str(HERE), "load", str(saved)], 3, timeout_s=100)
    assert (saved / "load3.ok").read_text() == "ok"


def test_manifest_is_written_after_every_rank_and_lists_each_shard(saved):
    import json

    from mmfusion.train.checkpoint import verify

    for mode in ("fsdp", "tp"):
        for folder in (saved / mode).iterdir():
            listed = json.loads((folder / "MANIFEST.json").read_text())["sha256"]
            assert sorted(listed) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.json"]
            assert verify(folder) is None


@pytest.mark.timeout(60)
def test_damaged_or_unfinished_checkpoint_is_skipped(saved, tmp_path):
    import shutil

    d = tmp_path / "fsdp"
    shutil.copytree(saved / "fsdp", d)
    newest = d / "step-00000002"
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages: list[str] = []
    model, opt = fresh()
    ckpt, _ = load_sharded(d, model, opt, log=messages.append)
    assert ckpt.step == 1 and "does not match its checksum" in messages[0]
    with pytest.raises(CheckpointError, match="damaged"):
        consolidate(newest)
    (d / "step-00000001" / "MANIFEST.json").unlink()  # as if the writer died before the manifest
    messages.clear()
    assert load_sharded(d, model, opt, log=messages.append) is None
    assert any("no MANIFEST.json" in m for m in messages)


@pytest.mark.timeout(60)
def test_consolidate_to_safetensors(saved, tmp_path):
    out = consolidate(saved / "tp" / "step-00000001", tmp_path / "model.safetensors")
    ref = torch.load(saved / "tp-ref.pt", weights_only=False)["model"]
    weights = load_file(str(out))
    assert weights.keys() == ref.keys()
    assert all(torch.equal(weights[k], ref[k]) for k in ref)
    model = Toy()
    model.load_state_dict(weights)


if __name__ == "__main__":
    {"save": worker_save, "load": worker_load}[sys.argv[1]](Path(sys.argv[2]))
