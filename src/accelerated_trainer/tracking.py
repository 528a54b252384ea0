"""What a run reports: metrics.jsonl (always), accelerate's trackers (wandb, tensorboard), progress,
and what reaches the console.

The tracker lifecycle is accelerate's: `init_trackers` / `log` / each tracker's `finish`, main
process only. The console gets the package's own lines and bars, on the main process only:
tqdm bars on a terminal, plain lines when the output is redirected, nothing with progress_bar
false; wandb's banner, history and summary go to {run_dir}/wandb.log instead, and datasets'
progress bars show only where the run's own bars do.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import ConfigError, ExperimentOptions, WandbOptions


WANDB_LOG = "wandb.log"  # in the run directory: what wandb would have printed
PLAIN_LINE_EVERY_S = 30.0  # redirected output: at most one progress line per this many seconds within an epoch


def interactive() -> bool:
    """Whether the console is a terminal: stdout and stderr both (bars would leave escape codes in a file)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def configure_console(is_main_process: bool, progress_bar: bool) -> None:
    """Set third-party console output for a run; call once, before its data is loaded.

    datasets' progress bars ("Flattening the indices", map and its tokenizing) show only where the
    run's own bars do: on the main process, with progress_bar true, on a terminal. Its warnings
    show on the main process only: every process would print the same.
    """
    import datasets  # the run loads its data with it next

    if not (is_main_process and progress_bar and interactive()):
        datasets.disable_progress_bars()
    if not is_main_process:
        datasets.logging.set_verbosity_error()


def route_wandb_console(path: Path) -> logging.Handler:
    """Send what wandb prints (banner, hints, the run's history and summary, warnings) to `path`.

    wandb prints through its terminal functions (wandb.termlog and its kin), which write to a
    fallback logger instead of stderr once set up "silent". wandb.setup() sets them up once per
    process, from its settings: it runs first, so that this setting is the one kept. The run's own
    settings stay as they are (silent there would print nothing anywhere). Undo with
    restore_wandb_console(handler).
    """
    import wandb

    wandb.setup()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("accelerated_trainer.wandb")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    wandb.termsetup(wandb.Settings(silent=True), logger)
    return handler


def restore_wandb_console(handler: logging.Handler) -> None:
    """wandb prints to the console again, as its own settings say; `path` is closed."""
    import wandb

    wandb.termsetup(wandb.setup().settings, None)
    logging.getLogger("accelerated_trainer.wandb").removeHandler(handler)
    handler.close()


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
        self._wandb_console: logging.Handler | None = None

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
            self.accelerator.print("tracking: no W&B credentials configured (or mode offline); W&B is logging offline "
                                   f"under {self.run_dir / 'wandb'}.")
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
            if "wandb" in self.trackers:
                self._wandb_console = route_wandb_console(self.run_dir / WANDB_LOG)
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
            self._drop("could not start", error)

    def _drop(self, what: str, error: BaseException) -> None:
        """Trackers never stand between the run and its checkpoints: one that fails (its service
        killed by the scheduler's signal, a server down) is reported once and dropped."""
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise error
        names = ", ".join(self.trackers)
        self.trackers = []
        self.accelerator.trackers.clear()
        if "wandb" in sys.modules:
            try:  # stops its service and unregisters the exit hook that would fail again at exit
                sys.modules["wandb"].teardown()
            except Exception:
                pass
        print(f"warning: the trackers ({names}) {what} ({type(error).__name__}: {error}); they are dropped for the "
              f"rest of the run. Training and checkpoints go on; {self.run_dir / 'metrics.jsonl'} keeps every value.",
              flush=True)

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
        if self.trackers:
            try:
                self.accelerator.log(values, step=step)
            except Exception as err:
                self._drop("failed to log", err)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the run summary (W&B), close the trackers and metrics.jsonl. Never raises for a
        tracker that fails: it is reported and dropped."""
        if not self.accelerator.is_main_process:
            return
        try:
            if self.trackers:
                self._wait_for_start()
            url = None
            if "wandb" in self.trackers:
                run = self.accelerator.get_tracker("wandb", unwrap=True)
                url = getattr(run, "url", None) if self.mode == "online" else None
                for key, value in summary.items():
                    run.summary[key] = _json_safe(_item(value))
            # Each tracker's own finish, not `end_training`: that also destroys the process group,
            # and only the main process gets here.
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers.clear()
        except Exception as err:
            self._drop("failed to finish", err)
            url = None
        finally:
            self._close_console()
        # The one line of W&B's that matters: where the run is, or how to upload it.
        if self.mode == "offline" and (self.run_dir / "wandb").is_dir():
            self.accelerator.print(f"wandb: upload this run with `wandb sync {self.run_dir / 'wandb'}/offline-run-*-{self.run_id}`")
        elif url:
            self.accelerator.print(f"wandb: run at {url}")

    def _close_console(self) -> None:
        """Close metrics.jsonl and give wandb the console back."""
        if self._metrics_file:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_console is not None:
            restore_wandb_console(self._wandb_console)
            self._wandb_console = None


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
    """Progress on the main process: on a terminal, tqdm bars (one for epochs, one for the steps
    of the current epoch); redirected, plain lines (one per epoch, and one every
    PLAIN_LINE_EVERY_S within a long epoch), so a log file holds no escape codes.

    Args:
        enabled: False shows nothing (other processes, progress_bar false, --quiet).
    """

    def __init__(self, enabled: bool, n_epochs: int, start_epoch: int):
        self.bars = enabled and interactive()
        self.lines = enabled and not self.bars
        self.n_epochs = n_epochs
        self.epochs_done = start_epoch
        self.epochs = tqdm(total=n_epochs, initial=start_epoch, desc="epochs", disable=not self.bars, position=0)
        self.steps = None
        self._epoch = start_epoch
        self._total = self._done = 0
        self._values: dict[str, Any] = {}
        self._started = self._printed = time.monotonic()

    def start_epoch(self, epoch: int, total: int, done: int = 0) -> None:
        if self.steps is not None:
            self.steps.close()
        self.steps = tqdm(total=total, initial=done, desc=f"epoch {epoch}", leave=False, disable=not self.bars, position=1)
        self._epoch, self._total, self._done = epoch, total, done

    def advance(self, n: int = 1) -> None:
        self.steps.update(n)
        if self.lines:
            self._done += n
            if time.monotonic() - self._printed >= PLAIN_LINE_EVERY_S:
                self._print_line(f"epoch {self._epoch}: {self._done}/{self._total} steps", self._values)

    def show(self, **values: Any) -> None:
        self.steps.set_postfix(_formatted(values), refresh=False)
        self._values = values

    def end_epoch(self, **values: Any) -> None:
        self.epochs.update(1)
        self.epochs.set_postfix(_formatted(values))
        self.epochs_done += 1
        if self.lines:
            self._print_line(f"epochs {self.epochs_done}/{self.n_epochs}", {**self._values, **values})

    def _print_line(self, head: str, values: dict[str, Any]) -> None:
        self._printed = time.monotonic()
        fields = ", ".join(f"{key} {value}" for key, value in _formatted(values).items())
        print(f"{head}{': ' + fields if fields else ''} ({self._printed - self._started:.1f} s)", flush=True)

    def close(self) -> None:
        for bar in (self.steps, self.epochs):
            if bar is not None:
                bar.close()


def _formatted(values: dict[str, Any]) -> dict[str, Any]:
    return {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in values.items()}


def say(accelerator, message: str) -> None:
    """Print once per job (accelerator.print prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def summary(result, seconds: float, kept) -> str:
    """The end-of-run summary of a TrainResult; what needs doing comes last."""
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.6g}"
    lines = [
        "", f"run finished: {result.stop_reason}",
        f"  run directory   {result.run_dir}",
        f"  epochs / steps  {result.epochs} / {result.steps} in {seconds:.1f} s",
        f"  best {result.monitor:<10} {best}  ({result.best_checkpoint or 'no validation'})",
        f"  last checkpoint {result.last_checkpoint or 'NOT SAVED'}",
        f"  top-k           {', '.join(e.path for e in kept) or '-'}",
    ]
    if getattr(result, "test_metrics", None):  # scored with the weights the model holds (best with restore_best)
        scores = ", ".join(f"{name} {value:.6g}" for name, value in result.test_metrics.items())
        lines.append(f"  test ({result.weights} weights) {scores}")
    if result.preempted and not result.save_error:
        lines.append("  to go on, run the same command with --set experiment_options.resume=true")
    if result.save_error:
        lines.append(f"error: {result.save_error}")
    return "\n".join(lines)
