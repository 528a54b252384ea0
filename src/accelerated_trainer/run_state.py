"""Where a run is (TrainingState, saved in every `last` checkpoint), what `train()` returns
(TrainResult), and the error of a diverged loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal


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
    preempted: bool = False  # stopped by a signal, Ctrl-C or max_time_s, with `last` saved: resume to go on
    interrupted: bool = False  # stopped by Ctrl-C (SIGINT)
    save_error: str | None = None  # on_save_error "continue": why the final state is not in `last`
    weights: Literal["best", "last"] = "last"  # what the model holds now: best/'s weights (restore_best) or the final ones
    test_metrics: dict[str, float] = field(default_factory=dict)  # the test split's, scored with `weights`; {} if none


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (training_options.nonfinite_loss: stop)."""

    @classmethod
    def at(cls, step: int, last, run_dir: Path) -> "NonFiniteLossError":
        """The error for a loss found non-finite by `step`; `last` is the checkpoint index's entry, or None."""
        kept = f"{run_dir / 'last'} (step {last.step}) keeps the last good state" if last else "no checkpoint was written yet"
        return cls(f"the training loss became NaN or infinite at or before step {step}; {kept}. Lower "
                   "training_options.optimizer.lr, set training_options.max_grad_norm, check the data for NaN/inf, or set "
                   "training_options.nonfinite_loss to \"skip\" to skip such steps.")
