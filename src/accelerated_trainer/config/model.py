"""model_options: the model a CLI run builds."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import _Named


class ModelOptions(_Named):
    name: str = "mlp"
    """A built-in model (mlp) or an import path package.module:Class."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Constructor keyword arguments."""
