"""What every config section shares: strict models with one docstring per field, and the error."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class _Named(_Section):
    @model_validator(mode="before")
    @classmethod
    def _expand_name(cls, value: Any) -> Any:
        # "AdamW" is shorthand for {"name": "AdamW"}: the common case stays one word in the config.
        return {"name": value} if isinstance(value, str) else value
