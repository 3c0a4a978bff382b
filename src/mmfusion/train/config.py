"""The `train:` section: the Trainer's settings, stages, parallelism, distillation, LoRA, callbacks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..data.config import DataConfig
from ..schema import Section


class StageConfig(Section):
    """One stage of a multi-stage run (T3): its own length, data subset, frozen parameters, learning
    rates and precision; unset fields fall back to the `train` section. Each stage starts a fresh
    optimizer and warm-up + cosine schedule over its trainable parameters.

    freeze and lr_groups keys are fnmatch patterns over `model.named_parameters()` names (e.g.
    "image_encoder.*", "encoders.text.*"); a pattern that matches no parameter is an error.
    objective: the model's own loss when unset; "probe" trains `model.probe` (cross-entropy on the
    probe label), "contrastive" the two-tower InfoNCE/dual loss.
    """

    name: str = Field(min_length=1)
    steps: int = Field(ge=1)
    objective: Literal["contrastive", "probe"] | None = None
    n_train: int | None = Field(None, ge=1)  # the first n_train samples of the (stage's) training split
    batch_size: int | None = Field(None, ge=1)
    freeze: list[str] = []
    lr: float | None = Field(None, gt=0, le=10)
    lr_groups: dict[str, float] = {}  # pattern -> lr for the trainable parameters it matches
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    eval_every: int | None = Field(None, ge=0)
    # this stage's own training data (a whole data section: source, paths, mixture); None = the run's data
    data: DataConfig | None = None

    @model_validator(mode="after")
    def _groups(self) -> StageConfig:
        for pattern, lr in self.lr_groups.items():
            if not 0 < lr <= 10:
                raise ValueError(f"lr_groups[{pattern!r}] = {lr}: a learning rate must be in (0, 10]")
        return self

    def train_overrides(self) -> dict[str, Any]:
        """The TrainConfig fields this stage sets (steps always)."""
        keys = ("batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_steps", "precision", "eval_every")
        out: dict[str, Any] = {"steps": self.steps}
        out.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        return out


# ---- parallelism (mmfusion.train.parallel, mmfusion.train.comm) -------------------------------------------
HookKind = Literal["allreduce", "fp16", "bf16", "powersgd", "local_sgd"]


class CommConfig(Section):
    """How DDP gradients travel (`parallel.comm`)."""

    hook: HookKind | None = None  # None: DDP's built-in C++ all-reduce
    compress_ratio: float | None = Field(None, gt=0.0, le=1.0)  # PowerSGD: picks the rank (see module doc)
    powersgd_rank: int | None = Field(None, ge=1)  # explicit rank; wins over compress_ratio
    powersgd_start_iter: int = Field(2, ge=1)  # plain all-reduce before this many steps
    local_sgd_period: int = Field(4, ge=1)  # average parameters every K optimizer steps
    local_sgd_warmup: int = Field(2, ge=0)  # global gradient all-reduce for the first steps


class FSDPConfig(Section):
    """FSDP2 (`fully_shard`) over the "dp" mesh dimension."""

    enabled: bool = False
    reshard_after_forward: bool = True
    param_dtype: Literal["fp32", "bf16", "fp16"] | None = None  # MixedPrecisionPolicy.param_dtype
    reduce_dtype: Literal["fp32", "bf16", "fp16"] | None = None  # MixedPrecisionPolicy.reduce_dtype
    cpu_offload: bool = False  # CPUOffloadPolicy; needs an accelerator (refused on CPU)


class TensorConfig(Section):
    """Tensor parallel over the "tp" mesh dimension (heads and MLP hidden units split)."""

    size: int = Field(1, ge=1)
    sequence_parallel: bool = False


class PipelineConfig(Section):
    """Pipeline parallel over the "pp" mesh dimension (`build_pipeline`)."""

    size: int = Field(1, ge=1)
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "gpipe"
    microbatches: int = Field(4, ge=1)
    stages_per_rank: int = Field(1, ge=1)  # > 1 only with interleaved_1f1b

    @model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        if self.schedule == "interleaved_1f1b" and self.stages_per_rank < 2:
            raise ValueError("pipeline.schedule=interleaved_1f1b needs pipeline.stages_per_rank >= 2")
        if self.schedule != "interleaved_1f1b" and self.stages_per_rank != 1:
            raise ValueError(f"pipeline.schedule={self.schedule} runs one stage per rank")
        return self


class ParallelConfig(Section):
    """`parallel:` section — how a run is split over processes. Defaults = plain DDP when world > 1."""

    data: bool = True  # DDP over "dp" (ignored when fsdp.enabled)
    fsdp: FSDPConfig = FSDPConfig()
    tensor: TensorConfig = TensorConfig()
    pipeline: PipelineConfig = PipelineConfig()
    comm: CommConfig = CommConfig()
    timeout_s: float = Field(300.0, gt=0)  # process-group collective timeout
    init_timeout_s: float = Field(60.0, gt=0)  # joining the group: a missing peer fails the start this fast


# ---- distillation (mmfusion.train.distill) -----------------------------------------------------------------
class DistillConfig(Section):
    """Distillation settings; maps 1:1 onto DistillationModel / wrap_for_distillation.

    teacher:      folder of the teacher's save_pretrained (config.json + model.safetensors).
    alpha:        weight of the KD term on labelled rows (1 - alpha on their CE); unlabelled rows use KD only.
    temperature:  softening T of both distributions; the KD term is scaled by T^2 (Hinton 2015).
    beta:         weight of feature matching (0 = off, and no projection is built).
    feature_loss: "mse" or "cosine" (1 - cosine similarity) between projected student and teacher features.
    n_labelled:   keep the labels of only the first n training samples (the rest become UNLABELLED).
    """

    teacher: str
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(4.0, gt=0.0)
    beta: float = Field(0.0, ge=0.0)
    feature_loss: Literal["mse", "cosine"] = "mse"
    n_labelled: int | None = Field(None, ge=0)


class CallbackConfig(Section):
    """One `train.callbacks` entry: `target` ("package.module:Name") is called with `args` (mmfusion.train.callbacks)."""

    target: str
    args: dict[str, Any] = {}


class LoraConfig(Section):
    """`train.lora`: LoRA adapters (mmfusion.train.lora) on the nn.Linear layers `targets` names (full names,
    dotted suffixes or regexes); every other parameter is frozen except those `trainable` names (fnmatch
    patterns, e.g. "head.*"). The run's saved model folder holds the merged weights; <run>/adapters the
    adapters alone."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(["attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"], min_length=1)
    trainable: list[str] = []


class TrainConfig(Section):
    """Modality-agnostic trainer settings."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    accumulation: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0, le=10)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    deterministic: bool = False
    # AdamW as one fused kernel where the parameters allow it (plain CPU/CUDA tensors; not FSDP2/TP shards)
    fused_optimizer: bool = True
    # CPU runs: "reuse" keeps freed memory in the process (glibc mallopt: no mmap/trim per large block, so
    # activations are not page-faulted in again every step; mmfusion.train.runtime); "system" leaves malloc alone
    cpu_allocator: Literal["reuse", "system"] = "reuse"
    # torch.compile the model: true (inductor) or a backend name ("aot_eager", ...); compiling takes minutes
    compile: bool | str = False
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    progress: bool = True
    # per-modality gradient accumulation (T7, seed 002): modality -> k; that modality's parameters (its encoder
    # and projection, as the model's `modality_parameters()` names them) are updated every k optimizer steps
    # with the mean of the k steps' gradients; the rest of the model every step
    modality_accumulation: dict[str, int] = {}
    # multi-stage runs (T3): the run goes through these in order; `steps` is then their sum
    stages: list[StageConfig] | None = None
    # how a multi-process run (mmfusion train --nproc N, torchrun) is split: DDP (default), FSDP2, tensor
    # parallel, communication hooks (S1-S4); ignored in one process
    parallel: ParallelConfig = ParallelConfig()
    # knowledge distillation (T5): the run's model is the student of a trained teacher (task runs)
    distill: DistillConfig | None = None
    # recompute every Transformer block in backward (T8): less activation memory, same loss and gradients
    grad_checkpointing: bool = False
    # a save_pretrained model folder whose weights (and tokenizer) start the run; the run's model config must
    # describe the same architecture
    init_from: str | None = None
    lora: LoraConfig | None = None
    # objects whose hooks the Trainer calls (mmfusion.train.callbacks), built before any work
    callbacks: list[CallbackConfig] = []

    @model_validator(mode="after")
    def _callbacks(self) -> TrainConfig:
        from .callbacks import resolve_target

        for i, cb in enumerate(self.callbacks):
            try:
                resolve_target(cb.target)
            except ValueError as e:
                raise ValueError(f"callbacks[{i}].target = {e}") from None
        return self

    @model_validator(mode="after")
    def _modality_accumulation(self) -> TrainConfig:
        for key, k in self.modality_accumulation.items():
            if k < 1:
                raise ValueError(
                    f"modality_accumulation[{key!r}] = {k}: expected a whole number of steps >= 1"
                )
        return self

    @model_validator(mode="after")
    def _parallel(self) -> TrainConfig:
        par = self.parallel
        sharded = par.fsdp.enabled or par.tensor.size > 1
        if par.pipeline.size > 1:
            raise ValueError(
                "parallel.pipeline.size > 1: the Trainer does not drive pipeline schedules; pipeline parallel "
                "is the library API mmfusion.train.parallel.build_pipeline (docs/distributed.md)"
            )
        if sharded and self.stages:
            raise ValueError(
                "parallel.fsdp / parallel.tensor with train.stages: a multi-stage run re-wraps the model per "
                "stage, which sharded models do not support yet; use DDP (the default) for staged runs"
            )
        if sharded and self.distill is not None:
            raise ValueError("train.distill with parallel.fsdp / parallel.tensor is not supported yet")
        if sharded and self.lora is not None:
            raise ValueError("train.lora with parallel.fsdp / parallel.tensor is not supported yet; use DDP")
        if sharded and any(k > 1 for k in self.modality_accumulation.values()):
            raise ValueError(
                "modality_accumulation with parallel.fsdp / parallel.tensor is not supported yet"
            )
        return self

    @model_validator(mode="after")
    def _stages(self) -> TrainConfig:
        if self.stages is None:
            return self
        if self.lora is not None:
            raise ValueError(
                "train.lora with train.stages: stages set which parameters train (train.stages.N.freeze), "
                "which would unfreeze the LoRA base weights; use one or the other"
            )
        if not self.stages:
            raise ValueError("stages is empty: list at least one stage or leave stages out")
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stages: duplicate stage name {dup[0]!r}; every stage needs its own name")
        total = sum(s.steps for s in self.stages)
        if "steps" in self.model_fields_set and self.steps != total:
            raise ValueError(
                f"steps = {self.steps} but the stages add up to {total}: with stages the run length is the "
                "sum of their steps (leave train.steps out)"
            )
        self.__dict__["steps"] = total
        return self


def refuse_train_settings(
    train: TrainConfig, kind: str, works: str, extra: dict[str, bool] | None = None
) -> None:
    """ConfigError naming the first `train:` setting that a `model.kind: <kind>` run does not support: stages,
    distillation, LoRA, init_from, FSDP and tensor parallelism (they need a model that names its parts, or a
    sharded model), plus `extra` ({dotted name: is it set}); `works` says what does work."""
    from ..errors import ConfigError

    refused = {
        "stages": bool(train.stages),
        "distill": train.distill is not None,
        "lora": train.lora is not None,
        "init_from": bool(train.init_from),
        **(extra or {}),
        "parallel.fsdp.enabled": train.parallel.fsdp.enabled,
        "parallel.tensor.size": train.parallel.tensor.size > 1,
    }
    bad = [k for k, v in refused.items() if v]
    if bad:
        raise ConfigError(
            f"train.{bad[0]}: not supported for a {kind} model (model.kind: {kind}); leave it out ({works})"
        )


__all__ = [
    "CallbackConfig",
    "CommConfig",
    "DistillConfig",
    "FSDPConfig",
    "HookKind",
    "LoraConfig",
    "ParallelConfig",
    "PipelineConfig",
    "StageConfig",
    "TensorConfig",
    "TrainConfig",
    "refuse_train_settings",
]
