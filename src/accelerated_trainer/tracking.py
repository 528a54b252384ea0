"""What a run reports: metrics.jsonl (always), accelerate's wandb tracker, and tqdm progress.

The tracker lifecycle is accelerate's: `init_trackers` / `log` / `end_training`, main process only.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import ExperimentOptions, WandbOptions


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
    """The `log_with` list for the Accelerator."""
    return [] if wandb_mode(options.wandb) == "disabled" else ["wandb"]


class Tracker:
    """Logs metrics to metrics.jsonl and, through accelerate, to W&B.

    The W&B run id is created once and kept in the checkpoint, so a resumed job continues the
    same W&B run.
    """

    def __init__(self, accelerator, options: ExperimentOptions, run_dir: Path, hyperparameters: dict):
        self.accelerator = accelerator
        self.options = options
        self.run_dir = Path(run_dir)
        self.hyperparameters = hyperparameters
        self.mode = wandb_mode(options.wandb)
        self.run_id: str | None = None
        self._metrics_file = None

    def start(self, run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex[:12]
        if not self.accelerator.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if self.mode == "disabled":
            return
        if self.mode == "offline":
            self.accelerator.print("wandb: no credentials configured (or mode offline); logging offline under "
                                   f"{self.run_dir / 'wandb'}.")
        wandb = self.options.wandb
        init = {
            "name": self.options.title, "id": self.run_id, "resume": "allow", "mode": self.mode,
            "dir": str(self.run_dir), "entity": wandb.entity, "tags": wandb.tags or None,
            "group": wandb.group, "notes": wandb.notes, "settings": {"console": "off"},
        }
        self.accelerator.init_trackers(wandb.project, config=self.hyperparameters, init_kwargs={"wandb": init})

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record metrics at an optimizer step: one JSON line, and the trackers."""
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self.mode != "disabled":
            self.accelerator.log(metrics, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.mode != "disabled":
            tracker = self.accelerator.get_tracker("wandb", unwrap=True)
            for key, value in summary.items():
                tracker.summary[key] = _plain(value)
            self.accelerator.end_training()
            if self.mode == "offline":
                self.accelerator.print(f"wandb: upload this run with `wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}`")
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


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
