"""Typed run configuration: YAML recipes + `--set key.sub=value` overrides, validated before any work.

Every section is a pydantic model that forbids unknown keys; `load_config` turns validation
failures into one `ConfigError` line naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .errors import ConfigError
from .schema import Section


class SyntheticConfig(Section):
    """The embedded synthetic world (mmfusion.data.synthetic)."""

    seed: int = 0
    n_train: int = Field(20000, ge=1)
    n_val: int = Field(500, ge=1)
    n_test: int = Field(1000, ge=1)
    object_count_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)

    @model_validator(mode="after")
    def _probs(self) -> SyntheticConfig:
        p = self.object_count_probs
        if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
            raise ValueError(f"object_count_probs must be 3 non-negative numbers summing to 1, got {list(p)}")
        return self


class DDWAConfig(Section):
    """`data.ddwa`: the DDWASampler's settings (mmfusion.data.samplers) when `data.sampler: ddwa`."""

    warmup: int = Field(100, ge=0)  # uniform steps before the first reweighting
    update_every: int = Field(50, ge=1)  # reweight every K steps after the warm-up
    boost: float = Field(1.3, gt=0)  # weight of the top samples (the others 1.0)
    top_fraction: float = Field(0.25, ge=0, le=1)  # share of the seen samples that gets `boost`


class DataConfig(Section):
    """Where samples come from. `synthetic` needs no files; `jsonl`/`webdataset` read user data.

    sampler: "shuffle" (an epoch permutation) or "ddwa" (dynamic data weighting of a task run's training
    samples by their per-sample gradient-norm proxy; see docs/recipes.md)."""

    source: Literal["synthetic", "jsonl", "webdataset"] = "synthetic"
    train: str | None = None
    val: str | None = None
    test: str | None = None
    synthetic: SyntheticConfig = SyntheticConfig()
    on_error: Literal["skip", "fail"] = "skip"
    num_workers: int = Field(0, ge=0, le=64)
    # webdataset: the shuffle-buffer size of the training stream; without data.val, the validation split is a
    # stratified hold-out of the training shards (every modality combination present, D8) of this fraction
    shuffle_buffer: int = Field(1000, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # training-time augmentation (mmfusion.data.engine.augment.AugmentConfig), webdataset training data only;
    # never applied to val/test
    augment: dict[str, Any] | None = None
    sampler: Literal["shuffle", "ddwa"] = "shuffle"
    ddwa: DDWAConfig = DDWAConfig()

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        if self.ddwa != DDWAConfig() and self.sampler != "ddwa":
            raise ValueError(f"ddwa is set but sampler = {self.sampler!r}; use sampler: ddwa")
        if self.source != "synthetic" and not self.train:
            raise ValueError(f"data.source={self.source} needs data.train (a manifest path or shard pattern)")
        if self.augment is not None:
            if self.source != "webdataset":
                raise ValueError(
                    "augment: augmentation applies to the streaming loader (data.source=webdataset)"
                )
            from .data.engine.augment import AugmentConfig

            try:
                AugmentConfig.model_validate(self.augment)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"augment.{where}: {first['msg'].removeprefix('Value error, ')}") from None
        return self


class TextConfig(Section):
    # a tokenizer.json to use instead of training one on the training captions (HF `tokenizers` breaks
    # ties between equally frequent BPE merges differently in every process, so pin one for bitwise
    # reproducible runs)
    tokenizer: str | None = None
    vocab_size: int = Field(1000, ge=16, le=1_000_000)
    context_length: int = Field(32, ge=4, le=4096)
    width: int = Field(128, ge=8)
    depth: int = Field(3, ge=1, le=96)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)


class ImageConfig(Section):
    # patch: one strided conv (ViT); conv: a stack of 3x3 stride-2 convs with the same token grid
    stem: Literal["patch", "conv"] = "patch"
    image_size: int = Field(32, ge=8, le=4096)
    patch_size: int = Field(4, ge=1)
    width: int = Field(128, ge=8)
    depth: int = Field(3, ge=1, le=96)
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _divisible(self) -> ImageConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
            )
        return self


class ProbeConfig(Section):
    """A classification head on the image embedding of the two-tower model (CL-FT, T2).

    The label is read from the sample's ground-truth scene: the colour, shape or size of the leftmost
    object (the one every caption names first), or the number of objects.
    """

    label: Literal["colour", "shape", "size", "count"] = "shape"
    hidden: int = Field(0, ge=0)  # 0: a linear probe; > 0: an MLP with one hidden layer of this width


class ModelConfig(Section):
    """Two-tower contrastive model (A3, T1)."""

    embed_dim: int = Field(128, ge=2)
    text: TextConfig = TextConfig()
    image: ImageConfig = ImageConfig()
    init_temperature: float = Field(0.07, gt=0, le=1)
    loss: Literal["infonce", "dual"] = "infonce"
    intra_weight: float = Field(0.5, ge=0)
    # a classification head on the image embedding, trained by stages with `objective: probe`
    probe: ProbeConfig | None = None


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
    n_train: int | None = Field(None, ge=1)  # the first n_train samples of the training split
    batch_size: int | None = Field(None, ge=1)
    freeze: list[str] = []
    lr: float | None = Field(None, gt=0, le=10)
    lr_groups: dict[str, float] = {}  # pattern -> lr for the trainable parameters it matches
    min_lr_ratio: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] | None = None
    eval_every: int | None = Field(None, ge=0)

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
        from .train.callbacks import resolve_target

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


class EvalConfig(Section):
    batch_size: int = Field(256, ge=1)
    recall_at: tuple[int, ...] = (1, 5, 10)
    grid_queries: int = Field(4, ge=0, le=32)


class MixtureSourceConfig(Section):
    """One training source of a mixture: `n` task samples that keep only `modalities` (the rest absent)."""

    name: str = Field(min_length=1)
    n: int = Field(ge=1)
    modalities: list[str] | None = None  # None: all of the task's modalities


class CurriculumPoint(Section):
    step: int = Field(ge=0)
    weights: list[float]


class MixtureConfig(Section):
    """Training on several sources (modality combinations) mixed by mmfusion.data.samplers (D3, T9).

    weighting: "proportional" (p_i ∝ n_i), "uniform", "temperature" (p_i ∝ n_i^(1/T)), "mas" (the
    modality-aware sampler, p_i ∝ c_i^alpha with c_i measured from the source's data: tokens + frames + audio
    seconds, each times `units`), or "curriculum" (piecewise-linear between `curriculum` milestones).
    The realised mixture is logged per step window (source/<name>, target/<name>) and plotted to
    <run>/mixture.png.
    """

    sources: list[MixtureSourceConfig] = Field(min_length=1)
    weighting: Literal["proportional", "uniform", "temperature", "mas", "curriculum"] = "temperature"
    temperature: float = Field(1.0, gt=0)
    alpha: float = 1.0
    units: dict[str, float] | None = None
    curriculum: list[CurriculumPoint] | None = None

    @model_validator(mode="after")
    def _check(self) -> MixtureConfig:
        names = [s.name for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"sources: duplicate source name {dup[0]!r}")
        if self.weighting == "curriculum":
            if not self.curriculum:
                raise ValueError("weighting = 'curriculum' needs curriculum: [{step, weights}, ...]")
            for i, point in enumerate(self.curriculum):
                if len(point.weights) != len(self.sources):
                    raise ValueError(
                        f"curriculum.{i}.weights has {len(point.weights)} entries; there are "
                        f"{len(self.sources)} sources"
                    )
        elif self.curriculum:
            raise ValueError(
                f"curriculum is set but weighting = {self.weighting!r}; use weighting: curriculum"
            )
        return self


class TaskConfig(Section):
    """A multimodal task on the synthetic world (mmfusion.tasks.TASKS), trained with `fusion_model`.

    mixture: train on several sources of the task (e.g. full pairs plus audio-only samples) mixed by a
    sampler instead of on `n_train` samples with every modality."""

    name: str
    n_train: int = Field(2000, ge=4)
    n_val: int = Field(200, ge=4)
    n_test: int = Field(400, ge=4)
    seed: int = 0
    vocab_size: int = Field(256, ge=16)
    context_length: int = Field(32, ge=4)
    image_size: int = Field(32, ge=8)
    num_frames: int = Field(4, ge=1)
    mixture: MixtureConfig | None = None

    @model_validator(mode="after")
    def _known(self) -> TaskConfig:
        from .tasks import TASKS

        if self.name not in TASKS:
            raise ValueError(f"name = {self.name!r}: unknown task; allowed: {', '.join(sorted(TASKS))}")
        have = TASKS[self.name].modalities
        for i, source in enumerate(self.mixture.sources if self.mixture else []):
            bad = [m for m in source.modalities or [] if m not in have]
            if bad or source.modalities == []:
                raise ValueError(
                    f"mixture.sources.{i}.modalities = {source.modalities}: pick a non-empty subset of the "
                    f"task's modalities {list(have)}"
                )
        return self


class RunConfig(Section):
    """A whole run: what to train, on what, how, and how to evaluate it.

    Without `task` the run trains the two-tower contrastive `model` on `data`. With `task` it trains a
    fusion model (`fusion_model`: a MultiModalConfig; its head and n_classes default to the task's) on
    that synthetic task, and `model`/`data` are unused.
    """

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig | None = None
    fusion_model: dict[str, Any] | None = None
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _distill_needs_task(self) -> RunConfig:
        if self.train.distill is not None and self.task is None:
            raise ValueError(
                "train.distill trains a fusion-model student on a task: set task (e.g. paired_colour)"
            )
        return self

    @model_validator(mode="after")
    def _run_options(self) -> RunConfig:
        from .data.ddwa import check_ddwa

        check_ddwa(self)
        if self.train.init_from and self.model.text.tokenizer:
            raise ValueError(
                "train.init_from and model.text.tokenizer are both set: the run uses the tokenizer of the "
                "model folder it starts from; leave model.text.tokenizer out"
            )
        return self

    @model_validator(mode="after")
    def _stage_objectives(self) -> RunConfig:
        stages = self.train.stages or []
        if self.model.probe is not None and self.task is None:
            if not any(s.objective == "probe" for s in stages):
                raise ValueError(
                    "model.probe is set but no stage in train.stages has objective: probe to train it"
                )
        for i, stage in enumerate(stages):
            if stage.objective is None:
                continue
            if self.task is not None:
                raise ValueError(
                    f"train.stages.{i}.objective = {stage.objective!r}: a task run trains the fusion model's "
                    "own head; leave objective out"
                )
            if stage.objective == "probe" and self.model.probe is None:
                raise ValueError(
                    f"train.stages.{i}.objective = 'probe' needs model.probe (e.g. model.probe.label=shape)"
                )
        return self

    @model_validator(mode="after")
    def _fusion_model(self) -> RunConfig:
        if self.task is None:
            if self.fusion_model is not None:
                raise ValueError("fusion_model is set but task is not: a fusion model trains on a task")
            return self
        from .models.multimodal import MultiModalConfig
        from .tasks import TASKS

        spec = TASKS[self.task.name]
        tree = {
            "encoders": {m: "tiny" for m in spec.modalities},
            "head": spec.head,
            "n_classes": spec.n_classes,
        }
        tree.update(self.fusion_model or {})
        try:
            MultiModalConfig.model_validate(tree)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            where = f"fusion_model.{where}" if where else "fusion_model"
            raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        self.__dict__["fusion_model"] = tree
        return self


def _is_section(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _section_of(annotation: Any) -> Any:
    """The BaseModel inside an annotation such as `X`, `X | None` or `list[X] | None` (else the annotation)."""
    if _is_section(annotation):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_of(arg)
        if _is_section(found):
            return found
    return annotation


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in err["loc"][:-1]:
            if isinstance(part, int):  # an item of a list section (e.g. train.stages.1)
                continue
            field = parent.model_fields.get(str(part)) if _is_section(parent) else None
            parent = _section_of(field.annotation) if field is not None else None
        allowed = sorted(parent.model_fields) if _is_section(parent) else []
        return f"unknown key '{key}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and isinstance(value, dict):
        # a section-level validator: its message already names the fields and values
        return f"{key}: {msg}" if err["loc"] else msg
    return f"{key} = {value!r}: {msg}"


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):  # an item of a list section: train.stages.1.steps
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(
                    f"--set {dotted}: '{part}' is not an index of {'.'.join(parts[:i])} (0..{len(node) - 1})"
                )
            key: Any = int(part)
            child = node[key]
        else:
            key = part
            child = node.get(part)
        if last:
            node[key] = value
            return
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict | list):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """['train.lr=3e-4', ...] -> [('train.lr', 3e-4), ...] with YAML typing of the value."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults), apply `--set` overrides, validate; raise ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections at the top level, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    return config_from_dict(tree, source=str(path) if path else "defaults")


def config_from_dict(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict into a RunConfig; the first problem becomes one ConfigError line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        errors = e.errors()
        first = _describe(errors[0], RunConfig)
        more = (
            f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
            if len(errors) > 1
            else ""
        )
        raise ConfigError(f"{source}: {first}{more}") from None


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's snapshot)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
