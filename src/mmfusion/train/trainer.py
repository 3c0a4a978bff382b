"""The training loop. It knows nothing about modalities: a model takes a Batch and returns a ModelOutput.

Owns: optimizer (AdamW) and warm-up + cosine schedule, gradient accumulation (T7) and clipping, the
precision policy (T6), DDP (S1), checkpoints with exact resume (S5), logging (tqdm, TensorBoard,
metrics.jsonl), and the step hooks (mmfusion.train.step_hooks: MoE expert-bias balancing, DDWA scoring).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from ..batch import Batch
from . import distributed as dist_utils
from .callbacks import build_callbacks
from .checkpoint import require_latest, save_checkpoint
from .config import TrainConfig
from .optim import ModalityAccumulator, adamw, clip_grad_norm, lr_lambda, param_groups  # noqa: F401 - re-exported
from .precision import autocast, grad_scaler, resolve_precision
from .rng import get_rng_state, set_rng_state
from .runtime import reuse_freed_memory
from .step_hooks import StepHooks, data_state, load_data_state


class TrainData(Protocol):
    """What the trainer needs from data: a fixed number of optimizer steps per epoch, resumable mid-epoch."""

    def steps_per_epoch(self) -> int: ...

    def step_batches(
        self, epoch: int, start_step: int, rank: int, world: int, accumulation: int
    ) -> Iterator[list[Batch]]: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("train.device = 'cuda': no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass(frozen=True)
class StageInfo:
    """Where a Trainer's steps sit in a multi-stage run (mmfusion.train.stages): stage `index` (0-based)
    named `name`, starting after `offset` steps of the earlier stages."""

    index: int
    name: str
    offset: int
    count: int = 1  # how many stages the run has (for messages)


class Trainer:
    """Runs `cfg.steps` optimizer steps of `model` on `data`, writing everything into `run_dir`.

    In a multi-stage run each stage gets its own Trainer with `stage` set: `step` counts the stage's
    steps, checkpoints are named by the run's global step (offset + step) and record the stage.
    `groups` replaces the default parameter groups (each may carry its own "lr").
    """

    def __init__(
        self,
        model: nn.Module,
        data: TrainData,
        cfg: TrainConfig,
        run_dir: str | Path,
        log: Callable[[str], None] = print,
        on_eval: Callable[[nn.Module, int], dict[str, float]] | None = None,
        stage: StageInfo | None = None,
        groups: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        checkpoints: bool = True,
    ):
        self.cfg = cfg
        self.checkpoints = checkpoints  # False: nothing written to run_dir/checkpoints (a federated client)
        self.stage = stage
        self.offset = stage.offset if stage is not None else 0
        self.run_dir = Path(run_dir)
        self.data = data
        self.on_eval = on_eval
        # hooks named in the config (train.callbacks) and passed from Python (mmfusion.train.callbacks)
        self.callbacks = [*build_callbacks(cfg.callbacks), *(callbacks or [])]
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cpu" and cfg.cpu_allocator == "reuse":
            reuse_freed_memory()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        dist_utils.init_from_env(self.device, cfg.parallel.timeout_s, cfg.parallel.init_timeout_s)
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.data_rank, self.data_world = self.rank, self.world  # how the data is split (see below)
        self.is_main = self.rank == 0
        self._log = log
        self.model = model.to(self.device)
        self.module = model  # the unwrapped model (for saving; FSDP2 / TP shard it in place)
        par = cfg.parallel
        # FSDP2 / tensor parallel: parameters are DTensors, checkpoints are sharded (mmfusion.train.dcp)
        self.sharded = dist_utils.is_distributed() and (par.fsdp.enabled or par.tensor.size > 1)
        comm = None
        if dist_utils.is_distributed():
            from .parallel import apply_parallelism, build_mesh, comm_handle

            try:
                mesh = build_mesh(par, device_type=self.device.type)
                self.model = apply_parallelism(self.model, par, mesh, self.device)
                # the ranks of one tensor-parallel group read the same data: data is split over "dp" only
                self.data_rank, self.data_world = mesh["dp"].get_local_rank(), mesh["dp"].size()
            except ValueError as e:
                from ..errors import ConfigError

                raise ConfigError(f"train.parallel: {e}") from None
            comm = comm_handle(self.model)
        # train.compile: the training forward runs compiled; eval, checkpoints and DDP's no_sync use the model
        self.forward = self.model
        if cfg.compile:
            self.forward = torch.compile(
                self.model, backend="inductor" if cfg.compile is True else cfg.compile
            )
        self.optimizer = adamw(
            groups if groups is not None else param_groups(self.module, cfg.weight_decay),
            lr=cfg.lr,
            betas=cfg.betas,
            fused=cfg.fused_optimizer,
        )
        if comm is not None:
            self.optimizer = comm.wrap_optimizer(self.optimizer)  # local SGD: periodic model averaging
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.scaler = grad_scaler(self.precision, self.device)
        self.accumulator = ModalityAccumulator(self.module, cfg.modality_accumulation)
        self.hooks = StepHooks(self.module, data)  # MoE expert-bias balancing, DDWA scoring
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.skipped: Counter[str] = Counter()
        self.ckpt_dir = self.run_dir / "checkpoints"

    def log(self, message: str) -> None:
        if self.is_main:
            self._log(message)

    # ---- checkpoints -------------------------------------------------------------------------------
    def _global_skipped(self) -> Counter[str]:
        """Skipped-sample counts summed over ranks (each rank reads its own part of the data)."""
        if not dist_utils.is_distributed():
            return Counter(self.skipped)
        counts: list[dict[str, int]] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(counts, dict(self.skipped))
        return sum((Counter(c) for c in counts), Counter())

    @property
    def global_step(self) -> int:
        return self.offset + self.step

    def _state(self, skipped: Counter[str]) -> dict[str, Any]:
        stage = {}
        if self.stage is not None:
            stage = {"stage": {**asdict(self.stage), "step": self.step, "steps": self.cfg.steps}}
        return {
            **stage,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": get_rng_state(),
            "skipped": dict(skipped),
            "precision": self.precision,
            "world_size": self.world,
            **({"data": data_state(self.data)[0]} if hasattr(self.data, "state_dict") else {}),
        }

    def save(self) -> None:
        skipped = self._global_skipped()  # a collective: every rank takes part
        if self.sharded:
            from .dcp import save_sharded

            save_sharded(
                self.ckpt_dir,
                self.global_step,
                self.model,
                self.optimizer,
                extra=self._state(skipped),
                keep=self.cfg.keep_checkpoints,
            )
            return
        if self.is_main:
            save_checkpoint(
                self.ckpt_dir,
                self.global_step,
                self.module.state_dict(),
                self.optimizer.state_dict(),
                self._state(skipped),
                self.cfg.keep_checkpoints,
                extra={
                    **{f"held_grad.{k}": v for k, v in self.accumulator.state_dict().items()},
                    **data_state(self.data)[1],
                },
            )
        if dist_utils.is_distributed():
            torch.distributed.barrier()

    def resume(self, ckpt=None) -> None:
        """Load the newest checkpoint that verifies (falling back past damaged ones), or `ckpt`."""
        if self.sharded:
            from .dcp import load_sharded

            got = load_sharded(
                self.ckpt_dir if ckpt is None else ckpt.path, self.model, self.optimizer, self.log
            )
            if got is None:
                from ..errors import CheckpointError

                raise CheckpointError(f"no valid checkpoint under {self.ckpt_dir} to resume from")
            ckpt, state = got
        else:
            ckpt = ckpt if ckpt is not None else require_latest(self.ckpt_dir, self.log)
            model_state, optim_state, state = ckpt.load()
        saved_stage = state.get("stage")
        if self.stage is None and saved_stage is not None:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"{ckpt.path} was written by a multi-stage run (stage {saved_stage['name']!r}): resume it "
                "with its train.stages"
            )
        if self.stage is not None and (saved_stage or {}).get("index") != self.stage.index:
            from ..errors import CheckpointError

            raise CheckpointError(
                f"{ckpt.path} is not a checkpoint of stage {self.stage.index} ({self.stage.name!r})"
            )
        if not self.sharded:  # (load_sharded has loaded them in place)
            self.module.load_state_dict(model_state)
            self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        extra = ckpt.load_extra()
        held = {k.removeprefix("held_grad."): v for k, v in extra.items() if k.startswith("held_grad.")}
        self.accumulator.load_state_dict(held, self.device)
        load_data_state(self.data, state.get("data"), extra, str(ckpt.path))
        self.step = saved_stage["step"] if self.stage is not None else ckpt.step
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        # the checkpoint holds the global counts: rank 0 carries them on, the other ranks start from zero
        self.skipped = Counter(state.get("skipped", {}) if self.is_main else {})
        where = f"step {self.global_step}"
        if self.stage is not None:
            s = self.stage
            where += f" = stage {s.index + 1}/{s.count} {s.name!r} step {self.step}"
        self.log(f"resumed from {ckpt.path} ({where}, epoch {self.epoch})")

    # ---- the loop ------------------------------------------------------------------------------------
    def _micro_step(self, batch: Batch, scale: float, sync: bool) -> tuple[float, dict[str, float], Any]:
        """Forward + backward of one micro-batch -> (loss, metrics, the model's output)."""
        batch = batch.to(self.device)
        no_sync = self.model.no_sync if (not sync and hasattr(self.model, "no_sync")) else nullcontext
        with no_sync():
            with autocast(self.precision, self.device):
                out = self.forward(batch)
            self.scaler.scale(out.loss * scale).backward()
        metrics = {k: float(v) for k, v in out.metrics.items()}
        return float(out.loss.detach()), metrics, out

    def _layout(self) -> str:
        if self.world == 1:
            return ""
        par = self.cfg.parallel
        kind = "FSDP2" if par.fsdp.enabled else "DDP" if par.data else "no data parallel"
        tp = f" x tensor parallel {par.tensor.size}" if par.tensor.size > 1 else ""
        hook = f", comm hook {par.comm.hook}" if par.comm.hook else ""
        return f" ({kind} over {self.data_world}{tp}{hook})"

    def full_model_state(self) -> dict[str, torch.Tensor] | None:
        """The whole (unsharded) model state dict on the CPU of rank 0 (None on the other ranks). A collective
        under FSDP2 / tensor parallel: every rank must call it."""
        if not self.sharded:
            return self.module.state_dict() if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=opts)
        return state if self.is_main else None

    def _log_precision(self) -> None:
        """Log (and write precision.json) what each part of the model ran in on the first step (T6)."""
        report = self.module.precision_report()
        if not report:
            return
        self.log(f"precision ({self.precision} policy): " + ", ".join(f"{k}={v}" for k, v in report.items()))
        (self.run_dir / "precision.json").write_text(
            json.dumps({"policy": self.precision, "ran_in": report}, indent=2)
        )

    def _modality_window(self, counts: Counter[str], n_samples: int, elapsed: float) -> dict[str, float]:
        """Per-modality data mix and throughput over a logging window (S7): mix/<m> = share of the window's
        samples that carried modality m; samples_per_s/<m> = those samples per second (all ranks)."""
        if not counts:
            return {}
        keys = sorted(counts)
        copies = self.world // self.data_world  # tensor-parallel ranks see the same samples
        totals = [c / copies for c in dist_utils.all_reduce_sum([float(counts[k]) for k in keys])]
        return {
            **{f"mix/{k}": c / max(n_samples, 1) for k, c in zip(keys, totals)},
            **{f"samples_per_s/{k}": c / max(elapsed, 1e-9) for k, c in zip(keys, totals)},
        }

    def _source_window(self, counts: Counter[str], first_step: int) -> dict[str, float]:
        """Realised share of each mixture source over the logging window (source/<name>, all ranks) and the
        sampler's mean target over the window's steps (target/<name>), when the data is a mixture
        (MixtureData, whose steps count like this Trainer's)."""
        names = getattr(self.data, "source_names", None)
        if not names:
            return {}
        totals = dist_utils.all_reduce_sum([float(counts[n]) for n in names])
        drawn = max(sum(totals), 1.0)
        steps = range(first_step, self.step)  # the steps of the window (self.step: the next one)
        targets = [self.data.target_mixture(t) for t in steps]
        return {
            **{f"source/{n}": c / drawn for n, c in zip(names, totals)},
            **{f"target/{n}": sum(t[n] for t in targets) / len(targets) for n in names},
        }

    def _batches(self) -> Iterator[list[Batch]]:
        while True:
            yield from self.data.step_batches(
                self.epoch, self.step_in_epoch, self.data_rank, self.data_world, self.cfg.accumulation
            )
            self.epoch += 1
            self.step_in_epoch = 0

    def fit(self, resume: bool = False, ckpt=None) -> dict[str, float]:
        """Train to `cfg.steps` (resuming from the newest valid checkpoint, or `ckpt`); returns the last
        logged metrics."""
        cfg = self.cfg
        if self.data.steps_per_epoch() < 1:
            from ..errors import DataError

            raise DataError(f"the training data is smaller than one batch of {cfg.batch_size} samples")
        if resume:
            self.resume(ckpt)
        self.model.train()
        writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=self.global_step + 1 if resume else None
            )
        jsonl = open(self.run_dir / "metrics.jsonl", "a") if self.is_main else None
        self.log(
            f"training on {self.device} in {self.precision}, {self.world} process(es){self._layout()}, "
            f"global batch {cfg.batch_size} = {self.data_world} x {cfg.accumulation} x "
            f"{cfg.batch_size // (self.data_world * cfg.accumulation)}"
        )
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (self.is_main and cfg.progress),
            dynamic_ncols=True,
            desc="train" if self.stage is None else f"stage {self.stage.name}",
        )
        if self.accumulator.groups:
            self.log(f"per-modality gradient accumulation: {self.accumulator.describe()}")
        last: dict[str, float] = {}
        window_t, window_n, window_wait = time.perf_counter(), 0, 0.0
        window_mod: Counter[str] = Counter()  # samples per modality in the logging window (S7)
        window_src: Counter[str] = Counter()  # samples per mixture source in the logging window (D3)
        window_first = self.step
        report_precision = self.is_main and hasattr(self.module, "precision_report")
        batches = self._batches()
        try:
            while self.step < cfg.steps:
                t_wait = time.perf_counter()
                micro = next(batches)
                window_wait += time.perf_counter() - t_wait
                n_samples = sum(len(b) for b in micro)
                losses, metrics, outputs = [], {}, []
                for i, b in enumerate(micro):
                    for _sid, reason in b.meta.get("skipped", []):
                        self.skipped[reason] += 1
                    for key, present in b.mask.items():
                        window_mod[key] += int(present.sum())
                    for name in b.meta.get("source") or ():
                        window_src[name] += 1
                    loss, metrics, out = self._micro_step(b, 1.0 / len(micro), sync=i == len(micro) - 1)
                    losses.append(loss)
                    if self.hooks.active:
                        outputs.append((b, out))
                if report_precision:
                    report_precision = False
                    self._log_precision()
                self.scaler.unscale_(self.optimizer)
                for cb in self.callbacks:  # e.g. FedProx's proximal gradient (mmfusion.federated.client)
                    if hasattr(cb, "on_before_optimizer_step"):
                        cb.on_before_optimizer_step(self)
                self.accumulator.hold(self.step + 1)
                grad_norm = float("nan")
                if cfg.grad_clip > 0:
                    grad_norm = clip_grad_norm(list(self.model.parameters()), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                if self.hooks.active:
                    metrics.update(self.hooks.after_step(outputs))
                self.step += 1
                self.step_in_epoch += 1
                window_n += n_samples * self.data_world
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_t
                    last = {
                        "step": self.global_step,
                        **({"stage": self.stage.name, "stage_step": self.step} if self.stage else {}),
                        "epoch": self.epoch,
                        "loss": dist_utils.all_reduce_mean(sum(losses) / len(losses)),
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "samples_per_s": window_n / max(elapsed, 1e-9),
                        # share of the window's wall time spent waiting for the next batch (data loading)
                        "data_wait_frac": window_wait / max(elapsed, 1e-9),
                        "time": time.time(),  # wall clock (Unix s): recovery time after a restart
                        **metrics,
                        **self._modality_window(window_mod, window_n, elapsed),
                        **self._source_window(window_src, window_first),
                    }
                    window_t, window_n, window_wait = time.perf_counter(), 0, 0.0
                    window_mod.clear()
                    window_src.clear()
                    window_first = self.step
                    bar.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.0f}")
                    if self.is_main:
                        jsonl.write(json.dumps(last) + "\n")
                        jsonl.flush()
                        for k, v in last.items():
                            if k not in ("step", "epoch", "stage", "stage_step", "time"):
                                writer.add_scalar(f"train/{k}", v, self.global_step)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.on_eval is not None:
                    self.model.eval()
                    results = self.on_eval(self.module, self.global_step)
                    self.model.train()
                    if self.is_main:
                        for k, v in results.items():
                            writer.add_scalar(f"val/{k}", v, self.global_step)
                        stage = {"stage": self.stage.name, "stage_step": self.step} if self.stage else {}
                        record = {
                            "step": self.global_step,
                            **stage,
                            **{f"val/{k}": v for k, v in results.items()},
                        }
                        jsonl.write(json.dumps(record) + "\n")
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self)
                if self.checkpoints and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save()
        finally:
            bar.close()
            if jsonl:
                jsonl.close()
            if writer:
                writer.close()
        self.model.eval()
        self.skipped = self._global_skipped()
        if self.skipped:
            self.log(
                "skipped samples by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
            )
        if self.is_main:
            (self.run_dir / "data_errors.json").write_text(json.dumps(dict(self.skipped), indent=2))
        return last
