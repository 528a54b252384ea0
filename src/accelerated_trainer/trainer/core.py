"""AcceleratedTrainer: coordinates data, model, optimizer, checkpoints, stopping and tracking.

It owns no policy: checkpoint policy is in checkpoint.py, stopping in early_stopping.py,
logging in tracking.py. Device placement, DDP/FSDP/DeepSpeed, mixed precision and gradient
accumulation are accelerate's.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from datetime import timedelta
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed

from .. import data, storage
from ..checkpoint import Checkpointer
from ..storage import CheckpointError
from ..config import ConfigError, TrainerConfig, load_config
from ..early_stopping import EarlyStopping
from ..models import build_model
from ..models import resolve as resolve_model
from ..metrics import ValidationMetrics, build_loss, per_sample
from ..optim import build_optimizer, build_scheduler
from ..preemption import StopRequest
from ..tracking import Progress, Tracker, trackers_for

# Settings whose change between a checkpoint and its resume changes what "the next batch" means.
RESUME_SENSITIVE = ("dataset_options.batch_size", "training_options.gradient_accumulation_steps", "training_options.seed")


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
        for key, value in state.items():
            setattr(self, key, value)


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


class AcceleratedTrainer:
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
        self._build_data(train_dataset, eval_dataset, collate_fn)
        self._build_model(model)
        self._build_components()

    # ------------------------------------------------------------ building

    def _build_accelerator(self) -> None:
        opts = self.config.training_options
        if opts.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("training_options.mixed_precision: fp16 needs a CUDA GPU and none is visible; use \"bf16\" on CPU or \"no\".")
        # accelerate keeps one AcceleratorState per process; a second trainer in the same process
        # (a notebook, a sweep) may want other precision settings. The process group is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            mixed_precision=opts.mixed_precision,
            gradient_accumulation_steps=opts.gradient_accumulation_steps,
            log_with=trackers_for(self.config.experiment_options) or None,
            project_dir=str(self.run_dir),
            # Data order is EpochSampler's pure function of (seed, epoch); accelerate need not sync
            # generators, and keeping the DataLoader's own generator keeps the global RNG untouched.
            rng_types=[],
            # A dead or hung process fails the job after this long instead of hanging it.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=self.config.experiment_options.distributed_timeout_s))],
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.accelerator.num_processes:
            raise ConfigError(
                f"the launcher started {launched} processes but accelerate runs {self.accelerator.num_processes} "
                "(each would train alone and overwrite the others' files). On CPU use: ACCELERATE_USE_CPU=1 "
                f"accelerate launch --multi_gpu --num_processes {launched} train.py --config CFG."
            )
        set_seed(opts.seed)
        # accelerate's optimizer wrapper costs ~0.25 ms per step on CPU (two importlib look-ups for LOMO
        # and an inspect.signature; bench/profile_step.py). Its work is needed only with a grad scaler
        # (fp16), XLA or DeepSpeed; otherwise the trainer checks sync_gradients itself and calls the
        # optimizer directly.
        self._plain_optimizer = getattr(self.accelerator, "scaler", None) is None and self.accelerator.distributed_type not in (
            DistributedType.XLA, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
        # With one micro-batch per step the `accumulate` context and backward's division of the loss
        # by 1 do nothing but cost time; so does the prepared DataLoader for a single process.
        self._plain_step = self._plain_optimizer and opts.gradient_accumulation_steps == 1

    def _build_data(self, train_dataset, eval_dataset, collate_fn) -> None:
        opts = self.config.dataset_options
        training = self.config.training_options
        with self.accelerator.main_process_first():
            splits = data.load_splits(opts, training.seed, train_dataset, eval_dataset)
        if splits.validation is None and training.early_stopping is not None:
            raise ConfigError("training_options.early_stopping needs validation data: set dataset_options.data_files.validation or validation_split.")
        label_dtype = torch.float32 if training.task == "regression" else torch.long
        self.train_loader = data.build_loader(
            splits.train, opts, label_dtype=label_dtype, batch_size=opts.batch_size, seed=training.seed, train=True,
            num_processes=self.accelerator.num_processes, collate_fn=collate_fn,
            in_process_device=self.accelerator.device if self._plain_step else None)
        self.train_sampler = self.train_loader.sampler  # the same object inside the prepared loader
        self.eval_loader = splits.validation and data.build_loader(
            splits.validation, opts, label_dtype=label_dtype, batch_size=opts.eval_batch_size or opts.batch_size,
            seed=training.seed, train=False, num_processes=self.accelerator.num_processes, collate_fn=collate_fn)
        self.data_info = data.describe(splits.train, opts, training.task, validation=splits.validation)
        self.data_fingerprint = splits.train._fingerprint  # datasets' content hash of the training split

    def _build_model(self, model: torch.nn.Module | None) -> None:
        training = self.config.training_options
        if model is None:
            if self.config.model_options is None:
                raise ConfigError("model_options: no model given; set model_options.name (e.g. \"mlp\") or pass a model to the trainer.")
            # The resolved options (input/output sizes from the data) go into config.json and checkpoints.
            self.config.model_options = resolve_model(self.config.model_options, self.data_info)
            model = build_model(self.config.model_options)
        else:
            self.config.model_options = None  # the model given wins; config.json must not claim another
        # HF models (and any forward with `labels`) compute their own loss when given the labels.
        self._pass_labels = "labels" in inspect.signature(model.forward).parameters
        self.loss_fn = build_loss(training.loss_function, training.task)
        optimizer = build_optimizer(training.optimizer, model)
        if isinstance(self.train_loader, data.InProcessLoader):
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        else:
            self.model, self.optimizer, self.train_loader = self.accelerator.prepare(model, optimizer, self.train_loader)
        if self.eval_loader is not None:
            self.eval_loader = self.accelerator.prepare(self.eval_loader)
        self.steps_per_epoch = -(-len(self.train_loader) // training.gradient_accumulation_steps)
        self._samples_per_micro_batch = self.config.dataset_options.batch_size * self.accelerator.num_processes
        total = self.steps_per_epoch * training.n_epochs
        self.total_steps = min(total, training.max_steps) if training.max_steps else total
        stepped = self.optimizer.optimizer if self._plain_optimizer else self.optimizer
        # Stepped by hand once per optimizer step: accelerate's wrapper would step it once per process.
        # Built on the optimizer that is stepped: the schedule hooks that optimizer's step().
        self.scheduler = build_scheduler(training.scheduler, stepped, self.total_steps)
        self._optimizer_step, self._zero_grad = stepped.step, stepped.zero_grad

    def _build_components(self) -> None:
        training = self.config.training_options
        self.checkpointer = Checkpointer(self.run_dir, self.accelerator, training.monitor, training.mode, training.save_top_k)
        stopping = training.early_stopping
        self.early_stopping = stopping and EarlyStopping(training.mode, stopping.patience, stopping.min_delta)
        self.tracker = Tracker(self.accelerator, self.config.experiment_options, self.run_dir, self.config.model_dump(mode="json"))
        self.state = TrainingState(num_processes=self.accelerator.num_processes)
        self.preempted = False
        self._step_skipped = False
        self._stop_on_nonfinite = self.config.training_options.nonfinite_loss == "stop"
        self.last_metrics: dict[str, float] = {}

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
            self.progress.close()
            self.stop_request.uninstall()
        return self._finish(stop_reason, time.perf_counter() - started)

    def _start_run(self) -> None:
        self._prepare_run_dir()
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
        stop_reason = self._stop_reason_before_start()
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
            self._tokens += _token_count(batch)
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
        losses, _ = self._forward(batch, per_sample_losses=False)
        return losses.mean()

    def _forward(self, batch: dict[str, torch.Tensor], per_sample_losses: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample losses and the model's predictions (None when it only returns a loss).

        With `per_sample_losses` false the losses come as the loss function returns them
        (elementwise, or the model's own mean): their mean is the same batch loss, with fewer ops.

        `features` is the model's first argument; any other input column (input_ids,
        attention_mask, ...) is a keyword argument; `labels` too when the forward accepts it.
        """
        labels = batch["labels"]
        inputs = {name: value for name, value in batch.items() if name != "labels"}
        args = (inputs.pop("features"),) if "features" in inputs else ()
        if self._pass_labels:
            inputs["labels"] = labels
        try:
            output = self.model(*args, **inputs)
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as err:
            if isinstance(err, torch.distributed.DistError):
                raise
            raise ModelError(
                f"the model's forward raised {type(err).__name__}: {err}. Its inputs come from "
                "dataset_options.feature_columns / input_columns; it was called as "
                f"model({'features, ' if args else ''}{', '.join(f'{k}=' for k in inputs)}) with {_shapes(batch)}; "
                f"{EXPECTED_OUTPUT.get(self.config.training_options.task, EXPECTED_OUTPUT['classification'])}"
            ) from err
        model_loss, predictions = _unpack_output(output)
        if model_loss is not None:
            return (per_sample(model_loss, labels.shape[0]) if per_sample_losses else model_loss), predictions
        if self.config.training_options.task == "regression" and predictions.numel() == labels.numel():
            predictions = predictions.reshape(labels.shape)  # (B, 1) outputs against (B,) targets
        try:
            if predictions.ndim > 2 and predictions.ndim == labels.ndim + 1:
                # One class distribution per position (B, T, C) against (B, T) targets.
                losses = self.loss_fn(predictions.flatten(0, -2), labels.flatten()).view(labels.shape)
            else:
                losses = self.loss_fn(predictions, labels)
        except (RuntimeError, ValueError, IndexError) as err:
            if self.config.training_options.task != "regression" and labels.dtype == torch.long and predictions.ndim >= 2:
                classes = predictions.shape[-1]
                low, high = int(labels.min()), int(labels.max())
                if low < 0 or high >= classes:
                    raise ModelError(
                        f"dataset_options.label_column {self.config.dataset_options.label_column!r} holds class {high if high >= classes else low} "
                        f"but the model outputs {classes} classes (0..{classes - 1}); fix the labels or the model's output size."
                    ) from err
            raise ModelError(
                f"{type(self.loss_fn).__name__} cannot compare the model output of shape {tuple(predictions.shape)} "
                f"with labels of shape {tuple(labels.shape)} (batch: {_shapes(batch)}): {err}. "
                f"{EXPECTED_OUTPUT.get(self.config.training_options.task, EXPECTED_OUTPUT['classification'])}"
            ) from err
        return (per_sample(losses, labels.shape[0]) if per_sample_losses else losses), predictions

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
            sample_losses, predictions = self._forward(batch)
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
            _say(self.accelerator, f"warning: {err} Training goes on (experiment_options.on_save_error: continue).")

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

    # ------------------------------------------------------------ run directory and resume

    def _prepare_run_dir(self) -> None:
        experiment = self.config.experiment_options
        if experiment.resume is False and self.checkpointer.has_checkpoints():
            if not experiment.overwrite:
                raise ConfigError(
                    f"run directory {self.run_dir} already holds checkpoints. Set experiment_options.resume to true to "
                    "continue it, choose another experiment_options.title, or set experiment_options.overwrite to true "
                    "to delete them."
                )
            self.checkpointer.clear()


    def _maybe_resume(self) -> None:
        resume = self.config.experiment_options.resume
        if resume is False:
            return
        path = None if resume is True else Path(resume)
        found, skipped = self.checkpointer.find_resumable(path)
        for reason in skipped:
            _say(self.accelerator, f"resume: passing over a checkpoint: {reason}")
        if found is None:
            if path is not None:
                raise ConfigError(f"experiment_options.resume: {path} is not a usable checkpoint ({'; '.join(skipped) or 'not found'}).")
            _say(self.accelerator, f"resume: no checkpoint in {self.run_dir}; starting a fresh run.")
            return
        saved = self.checkpointer.load(found, self.model, self.optimizer, self.scheduler)
        self._report_resume_changes(saved)
        if self.early_stopping and saved["early_stopping"]:
            self.early_stopping.load_state_dict(saved["early_stopping"])
        self.state.load_state_dict({k: saved[k] for k in asdict(self.state) if k in saved})
        self.state.num_processes = self.accelerator.num_processes
        _say(self.accelerator, f"resume: continuing from {found} at epoch {self.state.epoch}, step {self.state.step}.")

    def _report_resume_changes(self, saved: dict) -> None:
        old, new = saved["config"], self.config.model_dump(mode="json")
        for dotted in RESUME_SENSITIVE:
            section, key = dotted.split(".")
            if old[section][key] != new[section][key]:
                _say(self.accelerator, f"resume: {dotted} changed from {old[section][key]} to {new[section][key]}; "
                                       "the data order within the epoch will differ from the original run.")
        if saved["num_processes"] != self.accelerator.num_processes:
            _say(self.accelerator, f"resume: the checkpoint was written by {saved['num_processes']} processes, this run has "
                                   f"{self.accelerator.num_processes}; the rest of the current epoch is resharded.")
        if saved["data"]["train_fingerprint"] != self.data_fingerprint:
            _say(self.accelerator, f"resume: the training data changed since the checkpoint (fingerprint "
                                   f"{saved['data']['train_fingerprint']} -> {self.data_fingerprint}, "
                                   f"{saved['data']['train_rows']} -> {self.train_sampler.num_rows} rows).")

    def _stop_reason_before_start(self) -> str | None:
        training = self.config.training_options
        if self.state.epoch >= training.n_epochs:
            return f"completed {training.n_epochs} epochs (already done in the resumed checkpoint)"
        if training.max_steps and self.state.step >= training.max_steps:
            return f"reached max_steps={training.max_steps} (already done in the resumed checkpoint)"
        return None

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
        _say(self.accelerator, _summary(result, seconds, self.checkpointer.kept))
        return result


class ModelError(RuntimeError):
    """The model's forward failed, or its output does not fit the loss; the message names the shapes."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (training_options.nonfinite_loss: stop)."""


EXPECTED_OUTPUT = {
    "classification": "the loss expects outputs of shape (batch, classes) (or (batch, positions, classes)) and "
                      "int64 class indices of shape (batch,) (or (batch, positions)) below the number of classes.",
    "regression": "the loss expects outputs with as many values per example as the labels.",
}


def _shapes(batch: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{name} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}" for name, value in batch.items())


def _token_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens in a batch, from shapes only (no device sync): input_ids, or per-position labels."""
    if "input_ids" in batch:
        return batch["input_ids"].numel()
    labels = batch["labels"]
    return labels.numel() if labels.ndim > 1 else 0


def _say(accelerator, message: str) -> None:
    """Print once per job (accelerator.print prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def _unpack_output(output: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(loss, predictions) from a tensor, a dict, or an HF ModelOutput."""
    if isinstance(output, torch.Tensor):
        return None, output
    if isinstance(output, dict):  # ModelOutput is a dict too
        return output.get("loss"), output.get("logits", output.get("predictions"))
    if isinstance(output, (tuple, list)):
        return None, output[0]
    raise TypeError(f"the model returned {type(output).__name__}; return a tensor, a dict with 'loss'/'logits', or a ModelOutput.")


def _summary(result: TrainResult, seconds: float, kept) -> str:
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.6g}"
    lines = [
        "", f"run finished: {result.stop_reason}",
        f"  run directory   {result.run_dir}",
        f"  epochs / steps  {result.epochs} / {result.steps} in {seconds:.1f} s",
        f"  best {result.monitor:<10} {best}  ({result.best_checkpoint or 'no validation'})",
        f"  last checkpoint {result.last_checkpoint}",
        f"  top-k           {', '.join(e.path for e in kept) or '-'}",
    ]
    return "\n".join(lines)


Trainer = AcceleratedTrainer
