"""Why training stops (Stop), and early stopping: a pure decision over validation values,
agreed across processes, with state that survives a resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from .distributed import any_process
from .monitor import is_improvement


@dataclass(frozen=True)
class Stop:
    """Why training stops, whatever stopped it."""

    reason: str  # for people: "completed 10 epochs", "preempted by SIGTERM", ...
    preempted: bool = False  # a signal, Ctrl-C or max_time_s: `last` is saved and the run can be resumed
    interrupted: bool = False  # Ctrl-C (SIGINT)
    by_signal: bool = False  # a signal (a scheduler's, Ctrl-C): its grace time is for saving, not for evaluating


@dataclass
class EarlyStopping:
    """Counts evaluations without improvement of the monitored metric.

    Lightning's vocabulary: `monitor`, `patience` evaluations, `min_delta`, `mode`. A non-finite
    value counts as no improvement, so a diverged run stops after `patience` evaluations.
    """

    mode: Literal["min", "max"]
    patience: int
    min_delta: float = 0.0
    best: float | None = None
    evaluations_without_improvement: int = 0
    monitor: str = "val_loss"

    def check(self, metrics: dict[str, float], accelerator) -> Stop | None:
        """Record one evaluation's gathered metrics on every process; the agreed Stop, or None."""
        should_stop, reason = self.update(metrics[self.monitor])
        # Every process holds the same gathered value; the agreement makes that explicit.
        if any_process(accelerator, should_stop):
            return Stop(reason or f"early stopping: another process saw no improvement in {self.patience} evaluations")
        return None

    def update(self, value: float) -> tuple[bool, str | None]:
        """Record one validation value; return (should_stop, reason)."""
        if is_improvement(value, self.best, self.mode, self.min_delta):
            self.best = value
            self.evaluations_without_improvement = 0
            return False, None
        self.evaluations_without_improvement += 1
        reason = self.reason_to_stop()
        return reason is not None, reason

    def reason_to_stop(self) -> str | None:
        """Why the evaluations so far call for a stop (patience used up), or None; also after a resume."""
        if self.evaluations_without_improvement < self.patience:
            return None
        best = "none yet" if self.best is None else f"{self.best:.6g}"
        return (f"early stopping: no improvement of more than {self.min_delta} over the best ({best}) in "
                f"{self.evaluations_without_improvement} evaluations")

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.evaluations_without_improvement = state["evaluations_without_improvement"]
