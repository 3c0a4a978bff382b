"""S2: DDP communication hooks (fp16, PowerSGD, local SGD) on gloo with 2 processes, bytes counted."""

from __future__ import annotations

import copy
import datetime
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmfusion.layers import Transformer
from mmfusion.train.comm import CommConfig, count_allreduce_bytes, powersgd_payload, powersgd_rank_for_ratio
from mmfusion.train.parallel import ParallelConfig, apply_parallelism, build_mesh, comm_handle, launch_local

HERE = Path(__file__)
STEPS = 8


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.body = Transformer(64, 2, 4)
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        return self.head(self.body(self.inp(x))).squeeze(-1).mean(-1)


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    ref = Toy()
    result: dict = {}
    with pytest.raises(ValueError, match="gloo"):
        apply_parallelism(
            copy.deepcopy(ref), ParallelConfig(comm={"hook": "bf16"}), build_mesh(ParallelConfig())
        )
    result["bf16_refused"] = True
    for hook in ("allreduce", "fp16", "powersgd", "local_sgd"):
        cfg = ParallelConfig(comm={"hook": hook, "compress_ratio": 0.3, "local_sgd_period": 3})
        model = apply_parallelism(copy.deepcopy(ref), cfg, build_mesh(cfg))
        opt = comm_handle(model).wrap_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3))
        g = torch.Generator().manual_seed(10 + rank)
        per_step, losses, in_sync = [], [], []
        for _ in range(STEPS):
            x, y = torch.randn(4, 6, 8, generator=g), torch.randn(4, generator=g)
            with count_allreduce_bytes() as counter:
                loss = F.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            per_step.append(counter.bytes)
            losses.append(float(loss))
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.empty_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            in_sync.append(bool(torch.equal(gathered[0], gathered[1])))
        result[hook] = {"bytes": per_step, "loss": losses, "in_sync": in_sync, **comm_handle(model).info}
    if rank == 0:
        out.write_text(json.dumps(result))
    dist.destroy_process_group()


def test_compress_ratio_maps_to_a_powersgd_rank():
    model = Toy()
    shapes = [p.shape for p in model.parameters()]
    dense = sum(p.numel() for p in model.parameters())
    r = powersgd_rank_for_ratio(model, 0.3)
    assert r >= 1 and powersgd_payload(shapes, r) <= 0.3 * dense < powersgd_payload(shapes, r + 1)
    assert powersgd_rank_for_ratio(model, 0.9) > r
    assert powersgd_rank_for_ratio(model, 1e-6) == 1  # never below rank 1
    assert CommConfig().hook is None


@pytest.mark.timeout(150)
def test_hooks_on_gloo(tmp_path):
    out = tmp_path / "comm.json"
    launch_local([str(HERE), "worker", str(out)], 2, timeout_s=120)
    r = json.loads(out.read_text())
    assert r["bf16_refused"]
    dense = r["allreduce"]["bytes"][-1]
    assert dense > 0 and all(b == dense for b in r["allreduce"]["bytes"])
    assert r["fp16"]["bytes"][-1] == dense // 2
    # PowerSGD: plain all-reduce for the first 2 steps, then about compress_ratio of it
    assert r["powersgd"]["bytes"][0] == dense
    assert 0 < r["powersgd"]["bytes"][-1] <= 0.3 * dense + 1024
    # local SGD (period 3, warm-up 2): gradients all-reduced for 2 steps, then none; parameters (as many
    # bytes as the gradients) averaged after steps 2, 5, ...
    ls = r["local_sgd"]
    assert ls["bytes"] == [dense, dense, dense, 0, 0, dense, 0, 0]
    assert ls["in_sync"] == [True, True, True, False, False, True, False, False]
    assert all(r[h]["in_sync"] == [True] * STEPS for h in ("allreduce", "fp16", "powersgd"))
    for h in ("fp16", "powersgd", "local_sgd"):
        assert abs(r[h]["loss"][0] - r["allreduce"]["loss"][0]) < 1e-6  # same start
        assert all(v == v and v < 10 for v in r[h]["loss"])  # finite and sane


if __name__ == "__main__":
    worker(Path(sys.argv[2]))
