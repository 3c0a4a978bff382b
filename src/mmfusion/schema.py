"""The base of every typed config section (pydantic): unknown keys are errors, assignments are validated.

It lives below every package (modalities, data, models, train ...) so each section can sit next to its owner;
`mmfusion.config` composes them into a run's config.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


__all__ = ["Section"]
