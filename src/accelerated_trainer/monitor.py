"""Which of two values of a monitored metric is better: the one ordering that top-k checkpoints
and early stopping share (no torch, so the checkpoint layout can be read without it)."""

from __future__ import annotations

import math
from typing import Literal


def rank_key(value: float, mode: Literal["min", "max"]) -> float:
    """Sort key of a monitored value where smaller is better; NaN ranks worst."""
    if math.isnan(value):
        return math.inf
    return value if mode == "min" else -value


def is_improvement(value: float, best: float | None, mode: Literal["min", "max"], min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` by more than `min_delta`. NaN never improves; anything beats no best."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta
