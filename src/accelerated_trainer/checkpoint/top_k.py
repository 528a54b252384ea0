"""The top-k decision: which evaluated checkpoints to keep, best first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..monitor import rank_key


@dataclass
class Entry:
    """One kept checkpoint, as listed in checkpoints.json."""

    path: str
    epoch: int
    step: int
    value: float | None = None

    def __post_init__(self):
        if isinstance(self.value, str):  # "nan", "inf", "-inf": how JSON files hold them
            self.value = float(self.value)


def select_top_k(kept: list[Entry], candidate: Entry, k: int, mode: Literal["min", "max"]) -> tuple[list[Entry], list[Entry]]:
    """The top-k decision: (new kept list best first, evicted entries).

    The candidate enters only if there is room or it beats the worst kept entry strictly;
    ties keep the older checkpoint. k = -1 keeps everything, k = 0 nothing.
    """
    if k == 0:
        return [], list(kept)
    ranked = sorted([*kept, candidate], key=lambda e: (rank_key(e.value, mode), e is candidate))
    if k < 0:
        return ranked, []
    return ranked[:k], ranked[k:]
