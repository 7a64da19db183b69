"""Base of every params section (kept apart so section modules can import it without cycles)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, models are immutable, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
