"""The `data:` section: where samples come from, which fields feed which input, the target, mixtures.

Each section sits next to its owner; mmfusion.config composes them into a run's config.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from ..schema import Section


class TargetConfig(Section):
    """`data.target`: the field a sample's class comes from. `classes`: class names (a value is its index
    here); None = the field holds class indices, or (with string values) the classes are the sorted distinct
    values of the training split. Saved with the model, so predictions are named."""

    field: str = Field("label", min_length=1)
    classes: list[str] | None = None

    @model_validator(mode="after")
    def _classes(self) -> TargetConfig:
        if self.classes is not None and (
            len(self.classes) < 2 or len(set(self.classes)) != len(self.classes)
        ):
            raise ValueError(f"classes = {self.classes}: at least two distinct class names")
        return self


class TokenizerConfig(Section):
    """`data.tokenizer`: the BPE text tokenizer of fusion and unified runs, trained on the training split's
    texts unless `path` names a tokenizer.json (or a folder holding one) to reuse."""

    path: str | None = None
    vocab_size: int = Field(256, ge=16, le=1_000_000)
    context_length: int = Field(32, ge=4, le=4096)


class SyntheticConfig(Section):
    """The embedded synthetic world (mmfusion.data.synthetic) as a data source.

    task:  None = image-caption pairs (the two-tower model's data); a task name (mmfusion.tasks.TASKS: vqa,
           audio_image, video_text, audio_visual, paired_colour) = that task's samples, in the same format a
           JSONL manifest has (`mmfusion data synth --task NAME` writes them to disk).
    n_train / n_val / n_test: samples per split (default 20000 / 500 / 1000 pairs, 2000 / 200 / 400 task
           samples). task_seed: the task's own draws (questions, negatives). image_size: rendered images.
    """

    seed: int = 0
    task: str | None = None
    n_train: int | None = Field(None, ge=1)
    n_val: int | None = Field(None, ge=1)
    n_test: int | None = Field(None, ge=1)
    task_seed: int = 0
    image_size: int = Field(32, ge=8)
    object_count_probs: tuple[float, float, float] = (0.5, 0.3, 0.2)

    @model_validator(mode="after")
    def _task(self) -> SyntheticConfig:
        if self.task is not None:
            from .tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"task = {self.task!r}: unknown task; allowed: {', '.join(sorted(TASKS))}")
        return self

    def size(self, split: str) -> int:
        """Samples in `split` ("train" | "val" | "test"), defaults filled in."""
        given = {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]
        if given is not None:
            return given
        defaults = (
            {"train": 20000, "val": 500, "test": 1000}
            if self.task is None
            else {"train": 2000, "val": 200, "test": 400}
        )
        return defaults[split]

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


class MixtureSourceConfig(Section):
    """One training source of a mixture. Synthetic data: `n` consecutive samples of the training split;
    JSONL / WebDataset: `train`, its own manifest or shards. `modalities` keeps only those inputs (the others
    become absent); None keeps every one."""

    name: str = Field(min_length=1)
    n: int | None = Field(None, ge=1)
    train: str | None = None
    modalities: list[str] | None = None


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
    # model input (batch key) -> the sample / manifest field it reads, e.g. {text: question} for VQA; keys
    # not listed read the field of their own name. A synthetic task fills in its own.
    inputs: dict[str, str] = {}
    # the class a fusion model predicts (a synthetic task fills in its own)
    target: TargetConfig | None = None
    tokenizer: TokenizerConfig = TokenizerConfig()
    # several training sources mixed by a sampler (D3, T9)
    mixture: MixtureConfig | None = None

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
            from .engine.augment import AugmentConfig

            try:
                AugmentConfig.model_validate(self.augment)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"augment.{where}: {first['msg'].removeprefix('Value error, ')}") from None
        return self


__all__ = [
    "CurriculumPoint",
    "DDWAConfig",
    "DataConfig",
    "MixtureConfig",
    "MixtureSourceConfig",
    "SyntheticConfig",
    "TargetConfig",
    "TokenizerConfig",
]
