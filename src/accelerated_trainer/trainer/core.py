"""AcceleratedTrainer: train() and what it runs: the epochs, the step, and on their cadences
logging, validation and the checkpoint calls; resuming and the end of the run.

Building its parts from the config is TrainerParts's (build.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from .. import storage
from ..config import TrainerConfig, load_config
from ..metrics import ValidationMetrics
from ..preemption import StopRequest
from ..storage import CheckpointError
from ..tracking import Progress, configure_console
from . import resume
from .build import TrainerParts
from .forward import token_count
from .report import say, summary
from .state import TrainResult


class AcceleratedTrainer(TrainerParts):
    """Trains a torch model as its config says, on one CPU or a multi-node cluster alike.

    Args:
        model: any torch.nn.Module, or None to build the config's `model_options` model
            (built-in models size themselves from the data). It gets the feature tensor as its first argument, and
            `labels=` too when its forward accepts it; it may return predictions, or its own
            loss (HF ModelOutput.loss or a dict with "loss").
        config: a dict, a path to a JSON/YAML config, or a TrainerConfig.
        train_dataset / eval_dataset: a datasets.Dataset (or dict of columns) overriding the
            config's data files.
        collate_fn: for the per-row path (dataset_options.vectorization false).
    Raises:
        ConfigError: invalid config; DataError: data that does not fit it.
    """

    def __init__(self, model: torch.nn.Module | None, config, *, train_dataset=None, eval_dataset=None, collate_fn: Callable | None = None):
        self.config: TrainerConfig = load_config(config)
        self.run_dir = self.config.run_dir
        self._build_accelerator()
        configure_console(self.accelerator.is_main_process, self.config.experiment_options.progress_bar)
        self._build_data(train_dataset, eval_dataset, collate_fn)
        self._build_model(model)
        self._build_components()

    # ------------------------------------------------------------ the run

    def train(self) -> TrainResult:
        """Run the whole job: resume if asked, train and validate, checkpoint, stop, report."""
        started = time.perf_counter()
        self._start_run()
        try:
            stop_reason = self._run_epochs()
            if self.checkpointer.last is None or self.checkpointer.last.step != self.state.step:
                self._save_last()
            self._guard_save(self.checkpointer.wait)  # the run ends with its checkpoints on disk
        except BaseException as err:
            self._close_after_failure(err)
            raise
        finally:
            self.checkpointer.release_staging()  # nothing is in flight any more
            self.progress.close()
            self.stop_request.uninstall()
        return self._finish(stop_reason, time.perf_counter() - started)

    def _start_run(self) -> None:
        resume.prepare_run_dir(self.checkpointer, self.config.experiment_options, self.run_dir)
        self._maybe_resume()
        # Written only once the run can start: a refused resume leaves the directory as it was.
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            storage.atomic_write_json(self.run_dir / "config.json", self.config.model_dump(mode="json"))
        self.tracker.start(self.state.run_id, step=self.state.step)
        self.state.run_id = self.tracker.run_id
        training = self.config.training_options
        self.stop_request = StopRequest(self.accelerator, self.config.experiment_options.preemption_signals, training.max_time_s)
        self.stop_request.install()
        self.progress = Progress(self.config.experiment_options.progress_bar and self.accelerator.is_main_process,
                                 training.n_epochs, self.state.epoch)

    def _run_epochs(self) -> str:
        n_epochs = self.config.training_options.n_epochs
        stop_reason = resume.stop_reason_before_start(self.state, self.config.training_options)
        while stop_reason is None:
            stop_reason = self._train_epoch()
            if stop_reason is None and self.state.epoch >= n_epochs:
                stop_reason = f"completed {n_epochs} epochs"
        self.stop_request.drain()
        return stop_reason

    def _train_epoch(self) -> str | None:
        """Train to the end of the current epoch; return a stop reason if training must stop."""
        self.train_loader.set_epoch(self.state.epoch)
        # Resume mid-epoch: the sampler serves the rest of this epoch's permutation.
        self.train_sampler.start = self.state.samples_in_epoch
        done = self.state.samples_in_epoch // (self._samples_per_micro_batch * self.config.training_options.gradient_accumulation_steps)
        self.progress.start_epoch(self.state.epoch, self.steps_per_epoch, done)
        self._reset_log_window()
        for batch in self.train_loader:
            loss = self._training_step(batch)
            # A NaN/inf loss makes the window's sum non-finite: the stop policy checks it whenever it
            # syncs anyway (log, eval, save). The skip policy keeps skipped losses out of the mean.
            self._loss_sum += loss.detach() if self._stop_on_nonfinite else torch.nan_to_num(loss.detach(), 0.0, 0.0, 0.0)
            rows = batch["labels"].shape[0]
            self._micro_batches += 1
            self._samples += rows
            self._tokens += token_count(batch)
            self.state.samples_seen += rows * self.accelerator.num_processes
            if self.accelerator.sync_gradients and (reason := self._after_optimizer_step()):
                return reason
        # The epoch is done: validate (if not already on a step cadence), then save the full state.
        self.state.epoch += 1
        self.state.samples_in_epoch = 0
        reason = None
        if self.eval_loader is not None and not self.config.training_options.eval_every_n_steps:
            reason = self._evaluate_and_checkpoint()
        self._save_last()
        self.progress.end_epoch(**{k: v for k, v in self.last_metrics.items() if k == self.config.training_options.monitor})
        return reason

    def _training_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._plain_step:
            loss = self._training_loss(batch)
            loss.backward()
            self._optimizer_update()
        else:
            with self.accelerator.accumulate(self.model):
                loss = self._training_loss(batch)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self._optimizer_update()
        # Counted in full batches: every micro-batch but an epoch's last is full, and the epoch end resets it.
        self.state.samples_in_epoch += self._samples_per_micro_batch
        return loss

    def _optimizer_update(self) -> None:
        max_grad_norm = self.config.training_options.max_grad_norm
        skip_nonfinite = not self._stop_on_nonfinite
        if max_grad_norm or skip_nonfinite or self._logs_after_this_step():
            # Without clipping the norm is still measured, but only on the steps that need it.
            self._grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_grad_norm or float("inf"))
        # The skip policy's host sync: the norm of the all-reduced gradients is the same on
        # every process, so they all skip the same steps.
        if skip_nonfinite and not torch.isfinite(self._grad_norm).item():
            self.state.skipped_steps += 1
            self._step_skipped = True
        else:
            self.checkpointer.before_optimizer_step()  # an asynchronous save may still be copying the state
            self._optimizer_step()
        self._zero_grad(set_to_none=True)

    def _training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's mean loss: the mean of the per-sample losses, taken in one reduction."""
        losses, _ = self.batch_loss.compute(batch, per_sample_losses=False)
        return losses.mean()

    def _logs_after_this_step(self) -> bool:
        return (self.state.step + 1) % self.config.training_options.log_every_n_steps == 0

    def _after_optimizer_step(self) -> str | None:
        training = self.config.training_options
        if not (self._step_skipped or (not self._plain_optimizer and self.accelerator.optimizer_step_was_skipped)):
            self.scheduler.step()  # fp16 overflow and skipped non-finite steps leave the schedule alone
        self._step_skipped = False
        self.state.step += 1
        self.progress.advance()
        step = self.state.step
        if step % training.log_every_n_steps == 0:
            self._log_training()
        reason = None
        if training.eval_every_n_steps and step % training.eval_every_n_steps == 0 and self.eval_loader is not None:
            reason = self._evaluate_and_checkpoint()
        if training.save_every_n_steps and step % training.save_every_n_steps == 0:
            self._save_last()
        if reason is None and training.max_steps and step >= training.max_steps:
            reason = f"reached max_steps={training.max_steps}"
        if reason is None and (reason := self.stop_request.should_stop()):
            self.preempted = True
        return reason

    # ------------------------------------------------------------ logging, validation, checkpoints

    def _reset_log_window(self) -> None:
        self._loss_sum = torch.zeros((), device=self.accelerator.device)
        self._micro_batches = 0
        self._samples = 0
        self._tokens = 0
        self._grad_norm = None
        self._window_start = time.perf_counter()

    def _log_training(self) -> None:
        if self._micro_batches == 0:
            return
        # The one host sync of the loss per logging interval.
        loss = self.accelerator.reduce(self._loss_sum / self._micro_batches, reduction="mean").item()
        self._check_finite()
        elapsed = time.perf_counter() - self._window_start
        samples = self._samples * self.accelerator.num_processes
        metrics = {"train_loss": loss, "lr": self.scheduler.get_last_lr()[0], "epoch": self.state.epoch,
                   "samples_per_s": samples / max(elapsed, 1e-9)}
        if self._tokens:
            metrics["tokens_per_s"] = self._tokens * self.accelerator.num_processes / max(elapsed, 1e-9)
        if self._grad_norm is not None:
            metrics["grad_norm"] = float(self._grad_norm)
        if self.config.training_options.nonfinite_loss == "skip":
            metrics["skipped_steps"] = self.state.skipped_steps
        if self.accelerator.device.type == "cuda":
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**20
        self.tracker.log(metrics, step=self.state.step)
        self.progress.show(loss=loss, samples_per_s=metrics["samples_per_s"])
        self._reset_log_window()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over the whole validation split, gathered from every process."""
        self.model.eval()
        metrics = ValidationMetrics(self.config.training_options.task, self.accelerator)
        for batch in self.eval_loader:
            sample_losses, predictions = self.batch_loss.compute(batch)
            metrics.update(sample_losses, predictions, batch["labels"])
        self.model.train()
        return metrics.compute()

    def _check_finite(self) -> None:
        """Stop policy for a NaN/inf loss: raise before a diverged model is evaluated or saved."""
        if not self._stop_on_nonfinite:
            return
        if math.isfinite(self.accelerator.reduce(self._loss_sum, reduction="sum").item()):
            return
        last = self.checkpointer.last
        kept = f"{self.run_dir / 'last'} (step {last.step}) keeps the last good state" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"the training loss became NaN or infinite at or before step {self.state.step + 1}; {kept}. Lower "
            "training_options.optimizer.lr, set training_options.max_grad_norm, check the data for NaN/inf, or set "
            "training_options.nonfinite_loss to \"skip\" to skip such steps."
        )

    def _guard_save(self, save: Callable[[], Any]) -> None:
        """Run a checkpoint write under experiment_options.on_save_error."""
        try:
            save()
        except CheckpointError as err:
            if self.config.experiment_options.on_save_error == "stop":
                raise
            say(self.accelerator, f"warning: {err} Training goes on (experiment_options.on_save_error: continue).")

    def _evaluate_and_checkpoint(self) -> str | None:
        training = self.config.training_options
        self._check_finite()
        self.last_metrics = self.evaluate()
        value = self.last_metrics[training.monitor]
        self._guard_save(self.checkpointer.wait)  # a `last` save still in flight reports first
        self._guard_save(lambda: self.checkpointer.maybe_save_top(
            self.model, value, self.state.epoch, self.state.step, self.last_metrics))
        best = self.checkpointer.best
        self.tracker.log({**self.last_metrics, "epoch": self.state.epoch,
                          f"best_{training.monitor}": best.value if best else value}, step=self.state.step)
        if self.early_stopping is None:
            return None
        should_stop, reason = self.early_stopping.update(value)
        # Every process holds the same gathered value; the reduction makes the agreement explicit.
        flag = self.accelerator.reduce(torch.tensor(float(should_stop), device=self.accelerator.device), reduction="sum")
        return reason if flag.item() > 0 else None

    def _save_last(self) -> None:
        self._check_finite()
        trainer_state = {
            **self.state.state_dict(),
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping else None,
            "config": self.config.model_dump(mode="json"),
            "data": {"train_rows": self.train_sampler.num_rows, "train_fingerprint": self.data_fingerprint},
        }
        self._guard_save(self.checkpointer.wait)  # the save before, if still in flight, reports first
        self._guard_save(lambda: self.checkpointer.save_last(self.model, self.optimizer, self.scheduler, trainer_state,
                                                             asynchronous=self.config.experiment_options.async_save))

    # ------------------------------------------------------------ resume and the end of the run

    def _maybe_resume(self) -> None:
        found = resume.find_checkpoint(self.checkpointer, self.config.experiment_options.resume, self.run_dir, self.accelerator)
        if found is None:
            return
        saved = self.checkpointer.load(found, self.model, self.optimizer, self.scheduler)
        for change in resume.changes_since(saved, self.config.model_dump(mode="json"), self.accelerator.num_processes,
                                           self.data_fingerprint, self.train_sampler.num_rows):
            say(self.accelerator, change)
        if self.early_stopping and saved["early_stopping"]:
            self.early_stopping.load_state_dict(saved["early_stopping"])
        self.state.load_state_dict({k: saved[k] for k in asdict(self.state) if k in saved})
        self.state.num_processes = self.accelerator.num_processes
        say(self.accelerator, f"resume: continuing from {found} at epoch {self.state.epoch}, step {self.state.step}.")

    def _close_after_failure(self, err: BaseException) -> None:
        # Let a save in flight finish, so the last good state is kept (only this process's own
        # write: the others may never get here), and close the tracker so the logged history is
        # kept. Never mask the original error.
        try:
            self.checkpointer.wait(agree=False)
        except Exception:
            pass
        try:
            self.tracker.finish({"stop_reason": f"failed: {type(err).__name__}: {err}", "steps": self.state.step})
        except Exception:
            pass

    def _finish(self, stop_reason: str, seconds: float) -> TrainResult:
        best = self.checkpointer.best
        result = TrainResult(
            run_dir=self.run_dir, monitor=self.config.training_options.monitor,
            best_metric=best.value if best else None, best_checkpoint=best and self.run_dir / best.path,
            last_checkpoint=self.run_dir / "last", epochs=self.state.epoch, steps=self.state.step,
            stop_reason=stop_reason, metrics=self.last_metrics, preempted=self.preempted,
        )
        self.tracker.finish({"stop_reason": stop_reason, f"best_{result.monitor}": result.best_metric,
                             "steps": result.steps, "epochs": result.epochs, "seconds": seconds})
        say(self.accelerator, summary(result, seconds, self.checkpointer.kept))
        return result


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (training_options.nonfinite_loss: stop)."""


Trainer = AcceleratedTrainer
