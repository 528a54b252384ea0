"""What a run reports: metrics.jsonl (always), accelerate's trackers (wandb, tensorboard), tqdm progress.

The tracker lifecycle is accelerate's: `init_trackers` / `log` / each tracker's `finish`, main
process only.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import ConfigError, ExperimentOptions, WandbOptions


def wandb_mode(options: WandbOptions) -> str:
    """The configured mode, or online when W&B credentials are configured and offline when not."""
    if options.mode:
        return options.mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    return "online" if _has_wandb_credentials() else "offline"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def trackers_for(options: ExperimentOptions) -> list[str]:
    """The `log_with` list for the Accelerator: the configured trackers, less a disabled wandb.

    Raises:
        ConfigError: tensorboard is configured but not installed (accelerate would drop it silently).
    """
    names = [name for name in options.trackers if name != "wandb" or wandb_mode(options.wandb) != "disabled"]
    if "tensorboard" in names:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise ConfigError("experiment_options.trackers lists \"tensorboard\" but the tensorboard package is not "
                              "installed: pip install tensorboard (or pip install \"accelerated-trainer[tensorboard]\"), "
                              "or remove it from the list.")
    return names


class Tracker:
    """Logs metrics to metrics.jsonl and, through accelerate, to the configured trackers.

    The run id is created once and kept in the checkpoint, so a resumed job continues the same
    W&B run. TensorBoard writes under {run_dir}/tensorboard/{wandb.project}/.
    """

    def __init__(self, accelerator, options: ExperimentOptions, run_dir: Path, hyperparameters: dict):
        self.accelerator = accelerator
        self.options = options
        self.run_dir = Path(run_dir)
        self.hyperparameters = hyperparameters
        self.trackers = trackers_for(options)
        self.mode = wandb_mode(options.wandb) if "wandb" in self.trackers else "disabled"
        self.run_id: str | None = None
        self._metrics_file = None
        self._starting: threading.Thread | None = None
        self._start_error: BaseException | None = None

    def start(self, run_id: str | None = None, step: int = 0) -> None:
        """Open metrics.jsonl and start the trackers.

        Args:
            run_id: the run id saved in the checkpoint being resumed; None starts a new run.
            step: the optimizer step training resumes from. TensorBoard hides the events a crashed
                run logged after it, so a resumed curve has one value per step.
        """
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if not self.trackers:
            return
        if self.mode == "offline":
            self.accelerator.print("wandb: no credentials configured (or mode offline); logging offline under "
                                   f"{self.run_dir / 'wandb'}.")
        wandb = self.options.wandb
        init = {
            "wandb": {
                "name": self.options.title, "id": self.run_id, "resume": "allow", "mode": self.mode,
                "dir": str(self.run_dir), "entity": wandb.entity, "tags": wandb.tags or None,
                "group": wandb.group, "notes": wandb.notes, "settings": {"console": "off"},
            },
            # Events logged after `step` by a run that crashed before its next checkpoint are purged.
            "tensorboard": {"purge_step": step + 1} if step else {},
        }
        # accelerate writes TensorBoard events to {logging_dir}/{project}; logging_dir defaults to
        # the run directory, which would put them beside the checkpoints.
        self.accelerator.project_configuration.logging_dir = str(self.run_dir / "tensorboard")
        # wandb.init takes 0.5 to 2 s (its service process, the run's files): training starts
        # meanwhile, and the first log to the trackers waits for it (bench/bench_startup.py).
        self._starting = threading.Thread(target=self._start_trackers, args=(wandb.project, init), name="trackers-start", daemon=True)
        self._starting.start()

    def _start_trackers(self, project: str, init: dict) -> None:
        try:
            if self.mode == "offline":
                wait_past_offline_runs(self.run_dir / "wandb", self.run_id)
            self.accelerator.init_trackers(project, init_kwargs=init)
            for tracker in self.accelerator.trackers:
                # TensorBoard's hparams take flat scalars only; W&B shows the nested sections.
                flat = tracker.name == "tensorboard"
                tracker.store_init_configuration(_flatten(self.hyperparameters) if flat else self.hyperparameters)
        except BaseException as err:  # raised on the training thread by the next log or finish
            self._start_error = err

    def _wait_for_start(self) -> None:
        if self._starting is not None:
            self._starting.join()
            self._starting = None
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            raise error

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record metrics at an optimizer step: one JSON line, and the trackers."""
        if not self.accelerator.is_main_process:
            return
        values = {key: _item(value) for key, value in metrics.items()}
        row = {"step": step, **{key: _json_safe(value) for key, value in values.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self.trackers:
            self._wait_for_start()
            self.accelerator.log(values, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the run summary (W&B), close the trackers and metrics.jsonl."""
        if not self.accelerator.is_main_process:
            return
        try:
            self._wait_for_start()
        except BaseException:  # the trackers never started: metrics.jsonl is still closed
            self._close_metrics()
            raise
        if "wandb" in self.trackers:
            run = self.accelerator.get_tracker("wandb", unwrap=True)
            for key, value in summary.items():
                run.summary[key] = _json_safe(_item(value))
        # Each tracker's own finish, not `end_training`: that also destroys the process group, and
        # only the main process gets here.
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        if self.mode == "offline":
            self.accelerator.print(f"wandb: upload this run with `wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}`")
        self._close_metrics()

    def _close_metrics(self) -> None:
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None


def wait_past_offline_runs(wandb_dir: Path, run_id: str) -> None:
    """Return in a second that names no offline W&B run of `run_id` yet.

    wandb names an offline run's directory offline-run-{the second it started}-{id}: a resume
    that starts within the second of the run it continues would write into that run's directory.
    """
    while (wandb_dir / f"offline-run-{time.strftime('%Y%m%d_%H%M%S')}-{run_id}").exists():
        time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _item(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _json_safe(value: Any) -> Any:
    # JSON has no NaN or Infinity: store them as the strings "nan", "inf", "-inf".
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: scalars under dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Progress:
    """tqdm bars on the main process: one for epochs, one for the steps of the current epoch."""

    def __init__(self, enabled: bool, n_epochs: int, start_epoch: int):
        self.enabled = enabled
        self.epochs = tqdm(total=n_epochs, initial=start_epoch, desc="epochs", disable=not enabled, position=0)
        self.steps = None

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if self.steps is not None:
            self.steps.close()
        self.steps = tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False, disable=not self.enabled, position=1)

    def advance(self, n: int = 1) -> None:
        self.steps.update(n)

    def show(self, **values: Any) -> None:
        self.steps.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()}, refresh=False)

    def end_epoch(self, **values: Any) -> None:
        self.epochs.update(1)
        self.epochs.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()})

    def close(self) -> None:
        for bar in (self.steps, self.epochs):
            if bar is not None:
                bar.close()


def say(accelerator, message: str) -> None:
    """Print once per job (accelerator.print prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def summary(result, seconds: float, kept) -> str:
    """The end-of-run summary of a TrainResult."""
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.6g}"
    lines = [
        "", f"run finished: {result.stop_reason}",
        f"  run directory   {result.run_dir}",
        f"  epochs / steps  {result.epochs} / {result.steps} in {seconds:.1f} s",
        f"  best {result.monitor:<10} {best}  ({result.best_checkpoint or 'no validation'})",
        f"  last checkpoint {result.last_checkpoint}",
        f"  top-k           {', '.join(e.path for e in kept) or '-'}",
    ]
    if getattr(result, "test_metrics", None):  # scored with the weights the model holds (best with restore_best)
        scores = ", ".join(f"{name} {value:.6g}" for name, value in result.test_metrics.items())
        lines.append(f"  test ({result.weights} weights) {scores}")
    return "\n".join(lines)
