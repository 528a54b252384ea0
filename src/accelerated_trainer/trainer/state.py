"""Where a run is (TrainingState, saved in every `last` checkpoint) and what it ends with (TrainResult)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class TrainingState:
    """Where training is: resumable, saved in every `last` checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch, 0-based
    samples_in_epoch: int = 0  # samples of the current epoch consumed, all processes together
    samples_seen: int = 0  # training samples consumed in the whole run
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient (nonfinite_loss: skip)
    run_id: str | None = None  # the tracker run continued on resume
    num_processes: int = 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint's state.json holds other states beside these keys.
        for key in (f.name for f in fields(self)):
            if key in state:
                setattr(self, key, state[key])


@dataclass
class TrainResult:
    """What `train()` returns."""

    run_dir: Path
    monitor: str
    best_metric: float | None
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    epochs: int  # epochs completed
    steps: int  # optimizer steps completed
    stop_reason: str
    metrics: dict[str, float] = field(default_factory=dict)  # the last validation metrics
    preempted: bool = False  # stopped by a signal or max_time_s, with `last` saved: resume to go on
