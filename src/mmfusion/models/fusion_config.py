"""The fusion model's config (`model:` with kind fusion): MultiModalConfig, which MultiModalModel maps 1:1."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..fusion import FUSIONS
from ..modalities import EncoderConfigBase, encoder_config
from ..schema import Section

# cross_attention's default query stream: the first of these kinds the model has. Image queries over audio
# keys learn the audio-image tasks in tasks.py within 150 steps where audio queries stay at chance.
QUERY_PREFERENCE = ("text", "image", "video", "audio")


class MultiModalConfig(Section):
    """Everything MultiModalModel's constructor takes, typed; maps 1:1 onto its arguments.

    encoders: batch key -> encoder config; `kind` defaults to the key ("image", "text", "audio", "video"),
              a string is a built-in size ("tiny", "small", "base").
    fusion:   a name in mmfusion.fusion.FUSIONS; fusion_kwargs go to its constructor. For cross_attention the
              query modality defaults to the first encoder whose kind is text, else image, video, audio.
    head:     "classify" (n_classes logits, cross-entropy) or "match" (one logit, binary cross-entropy).
    classes:  optional class names (index i = class i; n_classes = their number): predictions are named.
    modality_dropout: in training, drop each present modality of each sample with this probability, never all.
    align_loss: weight of an "align before fuse" contrastive loss (ALBEF's ITC, Li et al. 2021) for match heads
              with two modalities: InfoNCE between the two modalities' mean-pooled, projected tokens over the
              positive pairs (label 1) of the batch. It gives each encoder a first-order signal; a match label
              alone is independent of either modality, and from scratch that plateaus at chance.
    precision: encoder key -> "fp32" | "bf16" | "fp16": the precision that encoder runs in (T6, seed 002's
              `"precision": {"text": "bf16", "image": "fp16"}`), under the one autocast policy of the run: a listed
              encoder runs in its own autocast region (fp32 = autocast off), its tokens return as fp32, and the
              projections, fusion and head follow the run's `train.precision`. Unlisted encoders follow it too.
              After a forward, `MultiModalModel.precision_report()` says what each part actually ran in.
    """

    kind: Literal["fusion"] = "fusion"  # a run config's `model.kind`
    encoders: dict[str, SerializeAsAny[EncoderConfigBase]]
    dim: int = Field(64, ge=2)
    fusion: str = "cross_attention"
    fusion_kwargs: dict[str, Any] = {}
    head: Literal["classify", "match"] = "classify"
    n_classes: int = Field(2, ge=2)
    classes: list[str] | None = None
    modality_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    align_loss: float = Field(0.0, ge=0.0)
    precision: dict[str, Literal["fp32", "bf16", "fp16"]] = {}

    @model_validator(mode="before")
    @classmethod
    def _encoder_configs(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("encoders"), dict):
            return data
        return {**data, "encoders": {k: encoder_config(k, v) for k, v in data["encoders"].items()}}

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, v: str) -> str:
        if v not in FUSIONS:
            raise ValueError(f"unknown fusion {v!r}; allowed: {', '.join(sorted(FUSIONS))}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _classes_set_n(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("classes"), list):
            n = len(data["classes"])
            if "n_classes" in data and data["n_classes"] != n:
                raise ValueError(
                    f"n_classes = {data['n_classes']} but classes names {n}: leave n_classes out"
                )
            data = {**data, "n_classes": n}
        return data

    @model_validator(mode="after")
    def _defaults(self) -> MultiModalConfig:
        if not self.encoders:
            raise ValueError("encoders: a model needs at least one encoder")
        if self.classes is not None and (
            self.head != "classify" or len(set(self.classes)) != len(self.classes)
        ):
            raise ValueError(f"classes = {self.classes}: distinct names, for head='classify'")
        if self.align_loss > 0 and (self.head != "match" or len(self.encoders) != 2):
            raise ValueError(
                f"align_loss={self.align_loss} needs head='match' and exactly two encoders; "
                f"got head={self.head!r} and encoders {sorted(self.encoders)}"
            )
        unknown = sorted(set(self.precision) - set(self.encoders))
        if unknown:
            raise ValueError(
                f"precision: {unknown} are not encoders of this model; its encoders are {sorted(self.encoders)}"
            )
        params = list(inspect.signature(FUSIONS[self.fusion].__init__).parameters)[
            3:
        ]  # after self, modalities, dim
        unknown = sorted(set(self.fusion_kwargs) - set(params))
        if unknown:
            raise ValueError(
                f"fusion_kwargs: {unknown} are not arguments of the {self.fusion} fusion; allowed: {', '.join(params)}"
            )
        if self.fusion == "cross_attention" and "query_modality" not in self.fusion_kwargs:
            kinds = {k: c.kind for k, c in sorted(self.encoders.items())}
            rank = {kind: i for i, kind in enumerate(QUERY_PREFERENCE)}  # modalities added later rank last
            query = min(kinds, key=lambda k: rank.get(kinds[k], len(rank)))
            # assign through __dict__: validate_assignment would re-run this validator
            self.__dict__["fusion_kwargs"] = {**self.fusion_kwargs, "query_modality": query}
        return self


def validate_section(cls: type[Section], data: dict[str, Any]) -> Any:
    """`cls.model_validate(data)`; the first problem as one ConfigError line."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{cls.__name__}: {key}: {err['msg'].removeprefix('Value error, ')}") from None


__all__ = ["QUERY_PREFERENCE", "MultiModalConfig", "validate_section"]
