"""Typed run configuration: YAML recipes + `--set key.sub=value` overrides, validated before any work.

Every section is a pydantic model that forbids unknown keys, defined next to its owner (data/config.py,
models/contrastive_config.py, models/multimodal.py, unified/recipe.py, train/config.py, eval/config.py); this
module composes them into a RunConfig. `load_config` turns validation failures into one `ConfigError` line
naming the key, the bad value and what is allowed.

`model.kind` picks the model: `contrastive` (the two-tower model, the default), `fusion` (encoders + a fusion
strategy + a classify / match head, MultiModalConfig), `unified` (the decoder over VQ tokens) or `vlm` (a frozen
image tower -> projector -> a local Hugging Face causal LM, models/vlm_config.py) or `diffusion` (the joint
image + text diffusion model, diffusion/config.py). Whatever the
kind, `data` says where samples come from: the synthetic world (image-caption pairs, or a task's samples),
a JSONL manifest or WebDataset shards.

The older spelling of a fusion run, `task: {name, n_train, ...}` + `fusion_model: {...}`, is still read: it
becomes `data: {source: synthetic, synthetic: {task: name, n_train, ...}}` + `model: {kind: fusion, ...}`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from .data.config import (  # noqa: F401 - re-exported: callers import the sections from here
    CurriculumPoint,
    DataConfig,
    DDWAConfig,
    MixtureConfig,
    MixtureSourceConfig,
    SyntheticConfig,
    TargetConfig,
    TokenizerConfig,
)
from .diffusion.config import DiffusionModelConfig
from .errors import ConfigError
from .eval.config import EvalConfig
from .models.contrastive_config import ImageConfig, ModelConfig, ProbeConfig, TextConfig  # noqa: F401
from .models.multimodal import MultiModalConfig
from .models.vlm_config import VLMConfig
from .schema import Section
from .train.config import (  # noqa: F401
    CallbackConfig,
    CommConfig,
    DistillConfig,
    FSDPConfig,
    HookKind,
    LoraConfig,
    ParallelConfig,
    PipelineConfig,
    StageConfig,
    TensorConfig,
    TrainConfig,
)
from .train.federated_config import FederatedConfig
from .unified.config import UnifiedModelConfig

ModelSection = Annotated[
    ModelConfig | MultiModalConfig | UnifiedModelConfig | VLMConfig | DiffusionModelConfig,
    Field(discriminator="kind"),
]
_LEGACY_TASK_KEYS = {"n_train", "n_val", "n_test", "image_size"}


def _legacy(tree: dict[str, Any]) -> dict[str, Any]:
    """`task:` + `fusion_model:` (the older spelling of a fusion run) -> `data.synthetic.task` + `model.kind:
    fusion`. Unknown keys inside them are left for validation to name."""
    if "task" not in tree and "fusion_model" not in tree:
        return tree
    tree = copy.deepcopy(tree)
    task = tree.pop("task", None)
    fusion = tree.pop("fusion_model", None)
    if fusion is not None or task is not None:
        model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
        if model and model.get("kind") != "fusion":
            raise ValueError(
                "task / fusion_model (the older spelling of a fusion run) and a non-fusion model are both set"
            )
        tree["model"] = _merge(
            {**model, "kind": "fusion"}, fusion or {}
        )  # `--set fusion_model.x` on a new recipe
    if isinstance(task, dict):
        data = tree["data"] = dict(tree.get("data") or {})
        synthetic = data["synthetic"] = dict(data.get("synthetic") or {})
        if "name" in task:
            synthetic["task"] = task["name"]
        for key in _LEGACY_TASK_KEYS & set(task):
            synthetic[key] = task[key]
        if "seed" in task:
            synthetic["task_seed"] = task["seed"]
        tok = {k: task[k] for k in ("vocab_size", "context_length") if k in task}
        if tok:
            data.setdefault("tokenizer", {}).update(tok)
        if "mixture" in task:
            data["mixture"] = _merge(data.get("mixture"), task["mixture"])
        unknown = sorted(
            set(task)
            - _LEGACY_TASK_KEYS
            - {"name", "seed", "vocab_size", "context_length", "mixture", "num_frames"}
        )
        if unknown:
            raise ValueError(f"task: unknown keys {unknown}")
    elif task is not None:
        raise ValueError("task: expected a mapping {name: ..., n_train: ...}")
    return tree


def _merge(base: Any, update: Any) -> Any:
    """`update` over `base`, recursively for mappings and index by index for lists (--set a.b.1.c=...)."""
    if isinstance(base, dict) and isinstance(update, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in update.items()}}
    if isinstance(base, list) and isinstance(update, dict) and all(str(k).isdigit() for k in update):
        out = list(base)  # `--set task.mixture.sources.0.n=96` built {"0": {...}} over the recipe's list
        for k, v in update.items():
            if int(k) >= len(out):
                raise ValueError(f"index {k} is past the end of a list of {len(out)}")
            out[int(k)] = _merge(out[int(k)], v)
        return out
    return update


def _task_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """A fusion model on a synthetic task: the task's encoders, head, classes, inputs and target unless set."""
    model, data = tree.get("model"), tree.get("data")
    if not isinstance(model, dict) or model.get("kind") != "fusion" or not isinstance(data, dict):
        return tree
    synthetic = data.get("synthetic")
    task = synthetic.get("task") if isinstance(synthetic, dict) else None
    if data.get("source", "synthetic") != "synthetic" or not isinstance(task, str):
        return tree
    from .data.tasks import TASKS

    spec = TASKS.get(task)
    if spec is None:
        return tree  # SyntheticConfig names the unknown task
    model = tree["model"] = dict(model)
    model.setdefault("encoders", spec.default_encoders())
    model.setdefault("head", spec.head)
    if spec.target.classes is not None:
        model.setdefault("classes", list(spec.target.classes))
    else:
        model.setdefault("n_classes", spec.n_classes)
    data = tree["data"] = dict(data)
    data.setdefault("inputs", dict(spec.inputs))
    data.setdefault("target", spec.target_config())
    return tree


class RunConfig(Section):
    """A whole run: what to train (`model`, by kind), on what (`data`), how (`train`), how to evaluate it."""

    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelSection = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    # edge-cloud federated training (`mmfusion federate`, mmfusion.federated); ignored by `mmfusion train`
    federated: FederatedConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _compose(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _legacy(data)
        model = data.get("model")
        if isinstance(model, dict) and "kind" not in model:
            data = {**data, "model": {**model, "kind": "contrastive"}}
        return _task_defaults(data)

    @property
    def kind(self) -> str:
        """The model kind: "contrastive" | "fusion" | "unified" | "vlm" | "diffusion"."""
        return self.model.kind

    @model_validator(mode="after")
    def _fusion_data(self) -> RunConfig:
        if self.kind != "fusion":
            if self.data.target is not None or self.data.inputs or self.data.mixture is not None:
                raise ValueError(
                    f"data.target / data.inputs / data.mixture are for fusion models; model.kind is {self.kind!r}"
                )
            if (
                self.data.source == "synthetic"
                and self.data.synthetic.task is not None
                and self.kind == "contrastive"
            ):
                raise ValueError(
                    f"data.synthetic.task = {self.data.synthetic.task!r} feeds a fusion model: set model.kind: fusion"
                )
            return self
        if self.data.target is None:
            self.data.__dict__["target"] = TargetConfig()
        target, model = self.data.target, self.model
        if target.classes is not None:
            if model.classes is None:
                model.__dict__["classes"] = list(target.classes)
                model.__dict__["n_classes"] = len(target.classes)
            elif list(model.classes) != list(target.classes):
                raise ValueError(
                    f"model.classes {model.classes} differ from data.target.classes {target.classes}"
                )
        unknown = sorted(set(self.data.inputs) - set(model.encoders))
        if unknown:
            raise ValueError(
                f"data.inputs: {unknown} are not encoders of the model; its encoders are {sorted(model.encoders)}"
            )
        if self.data.source == "synthetic" and self.data.synthetic.task is None:
            raise ValueError("model.kind = 'fusion' on synthetic data needs data.synthetic.task (e.g. vqa)")
        for i, source in enumerate(self.data.mixture.sources if self.data.mixture else []):
            if source.modalities is not None and (
                not source.modalities or set(source.modalities) - set(model.encoders)
            ):
                raise ValueError(
                    f"data.mixture.sources.{i}.modalities = {source.modalities}: pick a non-empty subset of the "
                    f"model's inputs {sorted(model.encoders)}"
                )
        return self

    @model_validator(mode="after")
    def _distill_needs_fusion(self) -> RunConfig:
        if self.train.distill is not None and self.kind != "fusion":
            raise ValueError("train.distill trains a fusion-model student: set model.kind: fusion")
        return self

    @model_validator(mode="after")
    def _run_options(self) -> RunConfig:
        from .data.ddwa import check_ddwa

        check_ddwa(self)
        if self.train.init_from and self.kind == "contrastive" and self.model.text.tokenizer:
            raise ValueError(
                "train.init_from and model.text.tokenizer are both set: the run uses the tokenizer of the "
                "model folder it starts from; leave model.text.tokenizer out"
            )
        return self

    @model_validator(mode="after")
    def _vlm_lora(self) -> RunConfig:
        """A vlm run with train.lora trains the projector too: "projector.*" joins train.lora.trainable."""
        lora = self.train.lora
        if self.kind == "vlm" and lora is not None and "projector.*" not in lora.trainable:
            lora.__dict__["trainable"] = [*lora.trainable, "projector.*"]
        return self

    @model_validator(mode="after")
    def _stage_objectives(self) -> RunConfig:
        stages = self.train.stages or []
        probe = self.model.probe if self.kind == "contrastive" else None
        if probe is not None and not any(s.objective == "probe" for s in stages):
            raise ValueError(
                "model.probe is set but no stage in train.stages has objective: probe to train it"
            )
        for i, stage in enumerate(stages):
            if stage.objective is None:
                continue
            if self.kind != "contrastive":
                raise ValueError(
                    f"train.stages.{i}.objective = {stage.objective!r}: a {self.kind} model trains its own "
                    "loss; leave objective out"
                )
            if stage.objective == "probe" and probe is None:
                raise ValueError(
                    f"train.stages.{i}.objective = 'probe' needs model.probe (e.g. model.probe.label=shape)"
                )
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


MODEL_KINDS = {
    "contrastive": ModelConfig,
    "fusion": MultiModalConfig,
    "unified": UnifiedModelConfig,
    "vlm": VLMConfig,
    "diffusion": DiffusionModelConfig,
}


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = list(err["loc"])
    kind = None
    if len(loc) > 1 and loc[0] == "model" and loc[1] in MODEL_KINDS:  # the model union's tag: not a key
        kind = loc.pop(1)
    key = ".".join(str(p) for p in loc) or "(top level)"
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        parent: Any = model
        for part in loc[:-1]:
            if isinstance(part, int):  # an item of a list section (e.g. train.stages.1)
                continue
            if parent is model and part == "model" and kind is not None:
                parent = MODEL_KINDS[kind]
                continue
            field = parent.model_fields.get(str(part)) if _is_section(parent) else None
            parent = _section_of(field.annotation) if field is not None else None
        allowed = sorted(parent.model_fields) if _is_section(parent) else []
        return f"unknown key '{key}'" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error" and isinstance(value, dict):
        # a section-level validator: its message already names the fields and values
        return f"{key}: {msg}" if loc else msg
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


def read_tree(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty without a path) with `--set key.sub=value` overrides applied;
    ConfigError for a missing file, invalid YAML or a non-mapping top level."""
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
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or the defaults), apply `--set` overrides, validate; raise ConfigError."""
    return config_from_dict(read_tree(path, overrides), source=str(path) if path else "defaults")


def validation_error(e: ValidationError, model: type[BaseModel], source: str) -> ConfigError:
    """A pydantic ValidationError of `model` as one ConfigError line: the first problem (key, value, what is
    allowed) and how many more there are."""
    errors = e.errors()
    first = _describe(errors[0], model)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return ConfigError(f"{source}: {first}{more}")


def config_from_dict(tree: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain dict into a RunConfig; the first problem becomes one ConfigError line."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise validation_error(e, RunConfig, source) from None


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the run directory's snapshot)."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
