"""AcceleratedTrainer: builds the run's parts from its config, then sequences them.

The trainer owns no policy: when and what to checkpoint, what a failed write does and how to
resume are the Checkpointer's (checkpoint/), when to stop early EarlyStopping's, when to log the
TrainWindow's (metrics.py), the optimizer step and its non-finite policy OptimizerStep's
(optim.py), stop requests from signals and time budgets StopRequest's (preemption.py), scoring
and predicting the Evaluator's (evaluation.py). Device
placement, DDP/FSDP, mixed precision and gradient accumulation are accelerate's.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Literal

import torch

from . import data, hf, host_memory
from .checkpoint import Checkpointer, RunSignature, files, load_weights_dir
from .checkpoint.states import MODEL, OPTIMIZER, TRAINER
from .config import ConfigError, TrainerConfig, load_config
from .distributed import build_accelerator, is_sharded
from .early_stopping import EarlyStopping, Stop
from .imports import import_object
from .loss import BatchLoss, ModelError, as_per_sample, binary_threshold, build_loss
from .evaluation import Evaluator
from .metrics import TrainWindow, build_metrics
from .models import from_config
from .optim import OptimizerStep, build_optimizer, steps_every_micro_batch
from .preemption import StopRequest
from .run_state import NonFiniteLossError, TrainingState, TrainResult
from .tracking import Progress, Tracker, configure_console, say, summary

__all__ = ["AcceleratedTrainer", "ModelError", "NonFiniteLossError", "Trainer", "TrainResult", "TrainingState"]


class AcceleratedTrainer:
    """Trains a torch model as its config says, on one CPU or a multi-node cluster alike.

    Args:
        model: any torch.nn.Module, or None to build the config's `model_options` model
            (built-in models size themselves from the data). It gets the feature tensor as its
            first argument, and `labels=` too when its forward accepts it; it may return
            predictions, or its own loss (HF ModelOutput.loss or a dict with "loss").
        config: a dict, a path to a JSON/YAML config, or a TrainerConfig.
        train_dataset / eval_dataset: data overriding the config's file for that split: a
            datasets.Dataset, a dict of columns or a pyarrow Table; or torch data, a map-style
            Dataset (dict or tuple items), an IterableDataset or a DataLoader (data/torch_data.py).
        collate_fn: for the per-row path over columns (dataset_options.vectorization false).
        loss_fn: the loss instead of training_options.loss_function: a torch.nn loss (its
            reduction is set to "none" on a copy) or a function (outputs, labels) -> loss, per
            sample or the batch mean.
        metrics: validation metrics beside the configured ones, by short name (reported as
            val_<name>, and monitorable): torchmetrics Metric objects, or functions
            (outputs, labels) -> float called once per evaluation with every row's outputs (a
            function's `higher_is_better` attribute gives the monitor's mode).
    Raises:
        ConfigError: invalid config; DataError: data that does not fit it.
    """

    def __init__(self, model: torch.nn.Module | None, config, *, train_dataset=None, eval_dataset=None,
                 collate_fn: Callable | None = None, loss_fn: Callable | None = None, metrics: dict[str, Any] | None = None):
        self.config: TrainerConfig = load_config(config, metrics=metrics or {})
        self.run_dir = self.config.run_dir
        self.accelerator = build_accelerator(self.config.training_options, self.config.experiment_options, self.run_dir)
        configure_console(self.accelerator.is_main_process, self.config.experiment_options.progress_bar)
        if self.accelerator.device.type == "cpu":
            host_memory.keep_freed_memory()  # the step's tensors live in malloc's heap: reuse, not fresh pages
        data_info, fingerprint = self._build_data(train_dataset, eval_dataset, collate_fn, model)
        self._build_loss(loss_fn)
        if self.binary_threshold is not None and "num_classes" in data_info:
            data_info = {**data_info, "num_classes": 1}  # one output, the score of class 1
        self._build_model(model, data_info)
        self._build_evaluator(metrics, data_info)
        self._build_components(fingerprint)

    # ------------------------------------------------------------ building, in order

    def _build_data(self, train_dataset, eval_dataset, collate_fn, model) -> tuple[dict, str | None]:
        """The loaders; returns what models take from the data and the training data's fingerprint."""
        opts, training = self.config.dataset_options, self.config.training_options
        # Before the data: a model directory that is not there fails fast; its tokenizer is the text's default.
        self.model_dir = hf.model_directory(self.config.model_options) if model is None else None
        if opts.text is not None and opts.text.tokenizer is None and self.model_dir is not None:
            opts = opts.model_copy(update={"text": opts.text.model_copy(update={"tokenizer": str(self.model_dir)})})
        batch_transform = opts.train_batch_transform and import_object(
            opts.train_batch_transform, "dataset_options.train_batch_transform", kind="function")
        self._input_names = tuple(data.forward_inputs(model))
        with self.accelerator.main_process_first():
            splits = data.load_splits(opts, training.seed, train_dataset, eval_dataset, input_names=self._input_names)
        # What the data decided (feature columns, the tokenizer's inputs, a DataLoader's batch size) goes into config.json.
        self.config.dataset_options = opts = splits.options
        if splits.validation is None and training.early_stopping is not None:
            raise ConfigError("training_options.early_stopping needs validation data: set dataset_options.data_files.validation "
                              "or validation_split, or pass eval_dataset= (iterable data and DataLoaders have no hold-out).")
        label_dtype = self._label_dtype()
        # For evaluate(dataset), predict() and the test split: built as the run's own loaders are.
        self._collate_fn, self._test_split, self._padding = collate_fn, splits.test, splits.padding
        # With one micro-batch per step the prepared DataLoader's bookkeeping buys nothing for one process.
        whole_steps = steps_every_micro_batch(self.accelerator)
        self.train_loader = data.build_loader(
            splits.train, opts, label_dtype=label_dtype, batch_size=opts.batch_size, seed=training.seed, train=True,
            num_processes=self.accelerator.num_processes, collate_fn=collate_fn,
            in_process_device=self.accelerator.device if whole_steps else None, padding=splits.padding)
        self.train_sampler = self.train_loader.sampler  # the same object inside the prepared loader
        self.eval_loader = splits.validation and data.build_loader(
            splits.validation, opts, label_dtype=label_dtype, batch_size=opts.eval_batch_size or opts.batch_size,
            seed=training.seed, train=False, num_processes=self.accelerator.num_processes, collate_fn=collate_fn,
            padding=splits.padding)
        self._batch_transform = batch_transform
        info = data.describe(splits.train, opts, training.task, validation=splits.validation)
        if names := data.label_names(splits.train, opts):
            info["label_names"] = names
        # datasets' content hash of the training split: a resume says when the data changed.
        return info, getattr(splits.train, "_fingerprint", None)

    def _label_dtype(self) -> torch.dtype:
        return torch.float32 if self.config.training_options.task == "regression" else torch.long

    def _build_loss(self, loss_fn: Callable | None) -> None:
        training = self.config.training_options
        self.loss_fn = as_per_sample(loss_fn) if loss_fn is not None else build_loss(training.loss_function, training.task)
        # A loss someone chose (not the task's default), named for the warning when the model's own loss wins.
        self._chosen_loss = ("the loss_fn given to the trainer" if loss_fn is not None else
                             training.loss_function and f"training_options.loss_function {training.loss_function.name!r}")
        if isinstance(self.loss_fn, torch.nn.Module):
            self.loss_fn.to(self.accelerator.device)  # class weights are buffers
        self.binary_threshold = binary_threshold(self.loss_fn) if training.task == "classification" else None

    def _build_model(self, model: torch.nn.Module | None, data_info: dict) -> None:
        training, opts = self.config.training_options, self.config.dataset_options
        # The resolved options (sizes from the data) go into config.json and checkpoints; a model
        # given wins, and config.json must then claim no other.
        model, self.config.model_options = (model, None) if model is not None else from_config(
            self.config.model_options, training.task, data_info, self.model_dir)
        # HF models (and any forward with `labels`) compute their own loss when given the labels.
        # Not packed text's: its labels are already the next tokens, and a causal LM shifts them
        # again (it would learn the token after next); its logits are scored against them here.
        # Read before `prepare`: a DDP wrapper's forward takes only *args, **kwargs.
        packed = opts.text is not None and training.task == "language_modeling"
        pass_labels = "labels" in inspect.signature(model.forward).parameters and not packed
        # A model sharded already (torch's fully_shard) is left as it is: accelerate would wrap it
        # in DDP (all-reducing what FSDP reduces itself) or shard it again.
        self.model, self.optimizer, self.train_loader, self.eval_loader = data.prepare(
            self.accelerator, model, build_optimizer(training.optimizer, model), self.train_loader, self.eval_loader,
            prepare_model=not is_sharded(model))
        if self._batch_transform:
            self.train_loader = data.with_batch_transform(self.train_loader, self._batch_transform)
        self.model_state = hf.model_state(self.accelerator, self.model, opts.text and opts.text.tokenizer)
        self.batch_loss = BatchLoss(self.model, self.loss_fn, pass_labels=pass_labels, task=training.task,
                                    label_column=opts.label_column, ignored_loss=self._chosen_loss)
        self._batches_per_epoch = batches = data.batches_per_epoch(self.train_loader)
        self.steps_per_epoch = batches and -(-batches // training.gradient_accumulation_steps)
        if self.steps_per_epoch is None and not training.max_steps and training.scheduler.name != "constant":
            raise ConfigError("training_options.max_steps: the training data has no length (an IterableDataset without "
                              "__len__), so the learning-rate schedule's length is unknown; set max_steps, or use the constant "
                              "schedule.")
        self._samples_per_micro_batch = opts.batch_size * self.accelerator.num_processes

    def _build_evaluator(self, given_metrics: dict[str, Any] | None, data_info: dict[str, int]) -> None:
        training = self.config.training_options
        metrics = build_metrics(training.metrics, given_metrics, task=training.task, num_classes=data_info.get("num_classes"),
                                binary=self.binary_threshold is not None, device=self.accelerator.device)
        if training.mode is None:  # a configured metric is monitored: its own direction decides
            training.mode = metrics.mode_for(training.monitor)
        self.evaluator = Evaluator(self.accelerator, self.batch_loss, metrics, self.config.dataset_options, task=training.task,
                                   label_dtype=self._label_dtype(), seed=training.seed, collate_fn=self._collate_fn,
                                   threshold=self.binary_threshold, padding=self._padding, input_names=self._input_names,
                                   label_names=data_info.get("label_names"))

    def _build_components(self, fingerprint: str) -> None:
        training, experiment = self.config.training_options, self.config.experiment_options
        total_steps = self.steps_per_epoch * training.n_epochs if self.steps_per_epoch else training.max_steps or 0
        total_steps = min(total_steps, training.max_steps) if training.max_steps else total_steps
        self.state = TrainingState(num_processes=self.accelerator.num_processes)
        self.window = TrainWindow(self.accelerator, training.log_every_n_steps, skip_nonfinite=training.nonfinite_loss == "skip")
        self.optimizer_step = OptimizerStep(
            self.accelerator, self.model, self.optimizer, loss_of=self.batch_loss.training_loss, scheduler=training.scheduler,
            total_steps=total_steps, max_grad_norm=training.max_grad_norm,
            skip_nonfinite=training.nonfinite_loss == "skip", wants_grad_norm=lambda: self.window.should_log(self.state.step + 1),
            before_step=lambda: self.checkpointer.before_optimizer_step())
        self.scheduler = self.optimizer_step.scheduler
        stopping = training.early_stopping
        self.early_stopping = stopping and EarlyStopping(training.mode, stopping.patience, stopping.min_delta, monitor=training.monitor)
        config = self.config.model_dump(mode="json")
        self.tracker = Tracker(self.accelerator, experiment, self.run_dir, config)
        states = {MODEL: self.model_state, OPTIMIZER: self.optimizer, "scheduler": self.scheduler, TRAINER: self.state}
        if (scaler := getattr(self.accelerator, "scaler", None)) is not None:
            states["scaler"] = scaler
        if self.early_stopping:
            states["early_stopping"] = self.early_stopping
        signature = RunSignature(config, self.accelerator.num_processes, self.train_sampler.num_rows, fingerprint, total_steps)
        self.checkpointer = Checkpointer(self.run_dir, self.accelerator, self.config.checkpoint, states, signature=signature,
                                         guard=self._check_finite)
        self.last_metrics: dict[str, float] = {}
        self._evaluated_step: int | None = None  # the step of the latest evaluation
        # What samples_in_epoch reaches on an epoch's last micro-batch (counted in full batches).
        batches = self._batches_per_epoch
        self._samples_per_epoch = batches * self._samples_per_micro_batch if batches else None

    # ------------------------------------------------------------ the run

    def train(self) -> TrainResult:
        """Run the whole job: resume if asked, train and validate, checkpoint, stop, report."""
        started = time.perf_counter()
        try:
            self._start_run()
        except BaseException:
            self.checkpointer.abort()  # gives the run directory back
            raise
        try:
            stop = self._run_epochs()
            self.checkpointer.finish(self.state.epoch, self.state.step)  # the run ends with its checkpoints on disk
            weights = self._maybe_restore_best(stop)
            test_metrics = self._maybe_score_test(stop)
        except BaseException as err:
            self._close_after_failure(err)
            raise
        finally:
            self.progress.close()
            self.stop_request.uninstall()
        return self._finish(stop, time.perf_counter() - started, weights, test_metrics)

    def _start_run(self) -> None:
        self.checkpointer.resume()
        self.state.num_processes = self.accelerator.num_processes
        # Written only once the run can start: a refused resume leaves the directory as it was.
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            files.atomic_write_json(self.run_dir / "config.json", self.config.model_dump(mode="json"))
        self.tracker.start(self.state.run_id, step=self.state.step)
        self.state.run_id = self.tracker.run_id
        training, experiment = self.config.training_options, self.config.experiment_options
        self.stop_request = StopRequest(self.accelerator, experiment.preemption_signals, training.max_time_s)
        self.stop_request.install()
        self.progress = Progress(experiment.progress_bar and self.accelerator.is_main_process, training.n_epochs, self.state.epoch)

    def _run_epochs(self) -> Stop:
        n_epochs = self.config.training_options.n_epochs
        stop = self._stop_before_start()
        if stop is not None:
            return stop
        while stop is None:
            stop = self._train_epoch()
            if stop is None and self.state.epoch >= n_epochs:
                stop = Stop(f"completed {n_epochs} epochs")
        self.stop_request.drain()
        # Weights no evaluation saw (max_steps, max_time_s, a step cadence) are scored before the
        # final checkpoint, so best/ and the index account for them. Not in a signal's grace time.
        if self.eval_loader is not None and self._evaluated_step != self.state.step and not stop.by_signal:
            self._evaluate_and_checkpoint()
        return stop

    def _train_epoch(self) -> Stop | None:
        """Train to the end of the current epoch; the Stop if training must stop."""
        self.train_loader.set_epoch(self.state.epoch)
        # Resume mid-epoch: the sampler serves the rest of this epoch's permutation.
        self.train_sampler.start = self.state.samples_in_epoch
        done = self.state.samples_in_epoch // (self._samples_per_micro_batch * self.config.training_options.gradient_accumulation_steps)
        self.progress.start_epoch(self.state.epoch, self.steps_per_epoch, done)
        self.window.reset()
        epoch = self.state.epoch
        for batch in self.train_loader:
            loss = self.optimizer_step.micro_batch(batch)
            rows = self.window.add(loss, batch)
            # Counted in full batches: every micro-batch but an epoch's last is full, and the epoch end resets it.
            self.state.samples_in_epoch += self._samples_per_micro_batch
            self.state.samples_seen += rows * self.accelerator.num_processes
            if self.optimizer_step.completed and (stop := self._after_optimizer_step()):
                return stop
        # The epoch is done (counted already if an evaluation ran on its last step): validate (if
        # not already on a step cadence), then save the full state.
        if self.state.epoch == epoch:
            self._complete_epoch()
        stop = None
        if self.eval_loader is not None and not self.config.training_options.eval_every_n_steps:
            stop = self._evaluate_and_checkpoint()
        self.checkpointer.on_epoch_end(self.state.epoch, self.state.step)
        self.progress.end_epoch(**{k: v for k, v in self.last_metrics.items() if k == self.config.training_options.monitor})
        return stop

    def _complete_epoch(self) -> None:
        self.state.epoch += 1
        self.state.samples_in_epoch = 0

    def _count_epoch_if_done(self) -> None:
        """Count the epoch on its last step already, when an evaluation or a stop at that step
        would otherwise see (and record) one epoch fewer than completed."""
        if self._samples_per_epoch and self.state.samples_in_epoch >= self._samples_per_epoch:
            self._complete_epoch()

    def _after_optimizer_step(self) -> Stop | None:
        training = self.config.training_options
        self.state.skipped_steps += self.optimizer_step.skipped
        self.state.step += 1
        self.progress.advance()
        step = self.state.step
        if self.window.should_log(step):
            self._log_training()
        stop = None
        if training.eval_every_n_steps and step % training.eval_every_n_steps == 0 and self.eval_loader is not None:
            self._count_epoch_if_done()
            stop = self._evaluate_and_checkpoint()
        self.checkpointer.on_step(self.state.epoch, step)
        if stop is None and training.max_steps and step >= training.max_steps:
            stop = Stop(f"reached max_steps={training.max_steps}")
        stop = stop or self.stop_request.should_stop()
        if stop is not None:
            self._count_epoch_if_done()
        return stop

    # ------------------------------------------------------------ logging and validation

    def _log_training(self) -> None:
        window = self.window.compute()  # the one host sync of the loss per logging interval
        if window is None:
            return
        self._raise_if_nonfinite(window["train_loss"])
        metrics = {"train_loss": window["train_loss"], "lr": self.scheduler.get_last_lr()[0], "epoch": self.state.epoch,
                   **{key: value for key, value in window.items() if key != "train_loss"}}
        if (grad_norm := self.optimizer_step.take_grad_norm()) is not None:
            metrics["grad_norm"] = grad_norm
        if self.config.training_options.nonfinite_loss == "skip":
            metrics["skipped_steps"] = self.state.skipped_steps
        if self.accelerator.device.type == "cuda":
            metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**20
        self.tracker.log(metrics, step=self.state.step)
        self.progress.show(loss=metrics["train_loss"], samples_per_s=metrics["samples_per_s"])
        self.window.reset()

    def evaluate(self, dataset=None, *, prefix: str = "val") -> dict[str, float]:
        """The current model's metrics over `dataset`, or over the validation split.

        Every process must call it; the values are gathered from all of them, each row once.

        Args:
            dataset: a datasets.Dataset, a dict of columns or a pyarrow Table with the config's
                columns, labels included; transforms run as for the training data.
            prefix: the metrics' names: {prefix}_loss, {prefix}_accuracy, ...
        Raises:
            ConfigError: no dataset given and no validation data. DataError: a dataset that does
                not fit the config.
        """
        loader = self.eval_loader if dataset is None else self.evaluator.loader_for(dataset, "evaluate", labels=True)
        if loader is None:
            raise ConfigError("evaluate() has nothing to score: pass a dataset, evaluate(dataset), or give validation data "
                              "(dataset_options.data_files.validation, dataset_options.validation_split or eval_dataset=).")
        return self.evaluator.score(loader, prefix)

    def predict(self, dataset) -> torch.Tensor:
        """The model's outputs for every row of `dataset` (labels not needed), in its order, on the CPU.

        Every process must call it; each gets all rows' outputs, gathered from every process
        without the rows repeated to even out the last batch.

        Raises:
            DataError: a dataset that does not fit the config. ModelError: the model returns only a loss.
        """
        return self.evaluator.predict(self.evaluator.loader_for(dataset, "predict", labels=False))

    def _check_finite(self) -> None:
        """Stop policy for a NaN/inf loss: raise before a diverged model is evaluated or saved."""
        if self.config.training_options.nonfinite_loss == "stop":
            self._raise_if_nonfinite(0.0 if self.window.is_finite() else float("nan"))

    def _raise_if_nonfinite(self, loss: float) -> None:
        if math.isfinite(loss) or self.config.training_options.nonfinite_loss != "stop":
            return
        raise NonFiniteLossError.at(self.state.step + 1, self.checkpointer.last, self.run_dir)

    def _evaluate_and_checkpoint(self) -> Stop | None:
        monitor = self.config.training_options.monitor
        self._check_finite()
        self.last_metrics = self.evaluate()
        self._evaluated_step = self.state.step
        self.checkpointer.on_evaluation(self.last_metrics, self.state.epoch, self.state.step)
        best = self.checkpointer.best
        self.tracker.log({**self.last_metrics, "epoch": self.state.epoch,
                          f"best_{monitor}": best.value if best else self.last_metrics[monitor]}, step=self.state.step)
        return self.early_stopping and self.early_stopping.check(self.last_metrics, self.accelerator)

    # ------------------------------------------------------------ the end of the run

    def _stop_before_start(self) -> Stop | None:
        """Why a resumed run has nothing left to do, or None."""
        training = self.config.training_options
        if self.state.epoch >= training.n_epochs:
            return Stop(f"completed {training.n_epochs} epochs (already done in the resumed checkpoint)")
        if training.max_steps and self.state.step >= training.max_steps:
            return Stop(f"reached max_steps={training.max_steps} (already done in the resumed checkpoint)")
        if self.early_stopping and (reason := self.early_stopping.reason_to_stop()):
            return Stop(f"{reason} (already done in the resumed checkpoint)")
        return None

    def _maybe_restore_best(self, stop: Stop) -> Literal["best", "last"]:
        """Load best/'s weights into the model (restore_best), unless the run is to be resumed; which weights it holds."""
        best = self.checkpointer.best
        if not self.config.training_options.restore_best or best is None or stop.preempted:
            return "last"
        if best.step != self.state.step:  # else the final weights are the best ones
            load_weights_dir(self.run_dir / best.path, self.model_state)
        return "best"

    def _maybe_score_test(self, stop: Stop) -> dict[str, float]:
        """Score the test split (dataset_options.data_files.test) with the weights the model holds; log it."""
        split, label = self._test_split, self.config.dataset_options.label_column
        if split is None or stop.preempted:  # a resumed run scores it when it ends
            return {}
        if label not in split.column_names:
            say(self.accelerator, f"the test split has no label column {label!r}: not scored. Predict it with "
                                  "trainer.predict(...) or python -m accelerated_trainer.predict.")
            return {}
        metrics = self.evaluator.score(self.evaluator.prepared(split, labels=True), prefix="test")
        self.tracker.log(metrics, step=self.state.step)
        return metrics

    def _close_after_failure(self, err: BaseException) -> None:
        # Let a save in flight finish, so the last good state is kept, and close the tracker so
        # the logged history is kept. Never mask the original error.
        self.checkpointer.abort()
        try:
            self.tracker.finish({"stop_reason": f"failed: {type(err).__name__}: {err}", "steps": self.state.step})
        except Exception:
            pass

    def _finish(self, stop: Stop, seconds: float, weights: Literal["best", "last"], test_metrics: dict[str, float]) -> TrainResult:
        best = self.checkpointer.best
        result = TrainResult(
            run_dir=self.run_dir, monitor=self.config.training_options.monitor,
            best_metric=best.value if best else None, best_checkpoint=best and self.run_dir / best.path,
            last_checkpoint=None if self.checkpointer.unsaved else self.run_dir / "last", epochs=self.state.epoch,
            steps=self.state.step, stop_reason=stop.reason, metrics=self.last_metrics, preempted=stop.preempted,
            interrupted=stop.interrupted, save_error=self.checkpointer.unsaved, weights=weights,
            test_metrics=test_metrics,
        )
        self.tracker.finish({"stop_reason": stop.reason, f"best_{result.monitor}": result.best_metric,
                             "steps": result.steps, "epochs": result.epochs, "seconds": seconds, **test_metrics})
        say(self.accelerator, summary(result, seconds, self.checkpointer.kept))
        return result


Trainer = AcceleratedTrainer
