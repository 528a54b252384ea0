"""experiment_options: run name and directory, resume, tracking, checkpoint faults."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field, field_validator

from .base import _Section


class WandbOptions(_Section):
    project: str = "accelerated-trainer"
    """W&B project name."""
    mode: Literal["online", "offline", "disabled"] | None = None
    """null: online when W&B credentials are configured, offline otherwise."""
    entity: str | None = None
    """W&B team or user."""
    tags: list[str] = Field(default_factory=list)
    """Tags for the run."""
    group: str | None = None
    """Group name, e.g. for a sweep."""
    notes: str | None = None
    """Free-text notes for the run."""


class ExperimentOptions(_Section):
    title: str = Field("run", min_length=1, pattern=r"^[^/\\]+$")
    """Run name: the run directory is {ckpt_dir}/{title} and the W&B run name."""
    ckpt_dir: str = "runs"
    """Parent directory of run directories."""
    resume: Union[bool, str] = False
    """true: continue from the run directory's last checkpoint (start fresh if there is none);
    a path: continue from that checkpoint directory."""
    overwrite: bool = False
    """Allow a fresh run into a run directory that already holds checkpoints (they are deleted)."""
    trackers: list[Literal["wandb", "tensorboard"]] = Field(default_factory=lambda: ["wandb"])
    """Trackers that receive every logged value through accelerate: wandb, tensorboard (event
    files under {run_dir}/tensorboard), both, or [] for none. metrics.jsonl is always written;
    wandb.mode "disabled" also turns wandb off."""
    wandb: WandbOptions = Field(default_factory=WandbOptions)
    """Weights & Biases settings, used when trackers lists wandb."""
    progress_bar: bool = True
    """tqdm progress bars on the main process."""
    preemption_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    """Signals that make every process finish its step, save `last` and exit with code 99."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A checkpoint write that fails (disk full, permission denied): stop with the error, or warn
    and keep training. Either way the earlier checkpoints and the index stay intact."""
    async_save: bool = True
    """Write `last` checkpoints on a background thread, so training does not wait for the disk.
    The thread copies the weights and optimizer state into host buffers while the next forward
    and backward run (the next optimizer step waits for that copy only), then writes, flushes
    and publishes the files at a pace that leaves most of the memory bandwidth to training. The
    buffers hold one copy of that state in host memory from the first save to the end of the
    run; set false where host memory is short, to write on the training thread instead. On
    epochs shorter than about ten saves, an epoch end's `last` waits (training does not) until
    the save before it took at most a tenth of the time since it began, and is then taken at
    the next step: the writer takes a tenth of the run at most. save_every_n_steps, best and
    top-k, a preemption and the end of training are saved when due."""
    distributed_timeout_s: float = Field(600, gt=0)
    """How long a collective may wait for another process before the job fails (a dead or hung rank)."""
    preflight_timeout_s: float = Field(300, gt=0)
    """Runs of several processes: how long they may take, before training, to form their process
    group, complete one all-reduce and check that the run directory is shared; a process still
    waiting then names its node and exits with code 3."""

    @field_validator("trackers")
    @classmethod
    def _unique_trackers(cls, trackers: list[str]) -> list[str]:
        # accelerate would start a tracker listed twice only once; say it once here too.
        return list(dict.fromkeys(trackers))
