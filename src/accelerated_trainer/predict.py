"""Predictions of a trained run for a data file, one output row per input row, in input order.

    python -m accelerated_trainer.predict runs/digits-mlp --data new.parquet --out preds.parquet [--checkpoint best]

The model is rebuilt from the run's config.json (its resolved model_options) and loaded from a
checkpoint of the run; the data goes through the run's dataset_options (columns, transforms),
labels not needed. Columns written: classification `prediction` (the class) and
`probabilities` (softmax over the classes), or for one binary output `prediction` and
`probability` (of class 1); regression `prediction` (the value, a list for several outputs);
per-position outputs (language modelling) `prediction`, the class at each position.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, TrainerConfig

WEIGHTS = "model.safetensors"  # checkpoint.store.WEIGHTS, without importing torch for a bad argument
SHARDED = "sharded.json"  # checkpoint.sharded.SHARDED: a sharded `last`, its weights put together from the shards


def predict_file(run_dir: str | Path, data_file: str | Path, out: str | Path, checkpoint: str = "best",
                 batch_size: int | None = None) -> int:
    """Write the predictions of `checkpoint` of a run for `data_file` to the parquet file `out`; the rows written.

    Raises:
        ConfigError: a missing run, checkpoint or data file, an output that is not .parquet, a
            run trained on a model given to the Python API. DataError: data that does not fit
            the run's columns. ModelError: the model does not take the data.
    """
    run_dir, out = Path(run_dir), Path(out)
    config = _run_config(run_dir)
    source = run_dir / checkpoint
    if not ((source / WEIGHTS).is_file() or (source / SHARDED).is_file()):
        raise ConfigError(f"--checkpoint: {source} holds no {WEIGHTS}; choose best, last or a top/... entry of "
                          f"{run_dir / 'checkpoints.json'}.")
    if out.suffix != ".parquet":
        raise ConfigError(f"--out: {out} must be a .parquet file.")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the directory {out.parent} does not exist.")
    if not (glob.glob(str(data_file)) if glob.has_magic(str(data_file)) else Path(data_file).exists()):
        raise ConfigError(f"--data: no file matches {str(data_file)!r} (relative to {Path.cwd()}).")
    outputs = _outputs(config, source, str(data_file), batch_size)
    _write(prediction_columns(outputs, config.training_options.task, _threshold(config)), out)
    return len(outputs)


def _run_config(run_dir: Path) -> TrainerConfig:
    from pydantic import ValidationError

    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: it has no config.json (pass the {{ckpt_dir}}/{{title}} of a run).")
    try:
        config = TrainerConfig.model_validate(json.loads(path.read_text()))
    except (ValidationError, ValueError) as err:
        raise ConfigError(f"{path} is not a valid run config: {err}") from None
    if config.model_options is None:
        raise ConfigError(f"{run_dir} was trained on a model given to the Python API, which the config cannot rebuild; "
                          "load its weights into that model (safetensors.torch.load_model) or use trainer.predict().")
    return config


def _outputs(config: TrainerConfig, source: Path, data_file: str, batch_size: int | None):
    import torch
    from accelerate import Accelerator

    from . import data
    from .checkpoint import ModelState, files, load_weights_dir
    from .loss import BatchLoss
    from .models import build_model

    if reason := files.verify(source):
        raise ConfigError(f"--checkpoint: {source} does not verify ({reason}); choose another checkpoint.")
    accelerator = Accelerator()  # the device, and the model's unwrapping for ModelState
    model = build_model(config.model_options)
    load_weights_dir(source, ModelState(accelerator, model))
    model = model.to(accelerator.device).eval()
    opts = config.dataset_options.model_copy(update={"data_files": {"predict": data_file}})
    rows = data.load_split(data.sources.load_file_split(opts, "predict"), opts, "predict", require_labels=False,
                           source=f"--data {data_file}")
    loader = data.build_loader(rows, opts, label_dtype=torch.float32, batch_size=batch_size or opts.eval_batch_size or opts.batch_size,
                               seed=config.training_options.seed, train=False, with_labels=False)
    forward = BatchLoss(model, None, pass_labels=False, task=config.training_options.task, label_column=opts.label_column).forward
    outputs = []
    with torch.no_grad():
        for batch in loader:
            _, predictions = forward({key: value.to(accelerator.device) for key, value in batch.items()})
            if predictions is None:
                raise ConfigError("the model returned no outputs (only a loss); nothing to write.")
            outputs.append(predictions.float().cpu())
    return torch.cat(outputs)


def _threshold(config: TrainerConfig) -> float | None:
    """0 for a one-output classifier trained on logits, 0.5 on probabilities (BCELoss); None for other losses."""
    from .loss import binary_threshold, build_loss

    training = config.training_options
    return binary_threshold(build_loss(training.loss_function, training.task)) if training.task == "classification" else None


def prediction_columns(outputs, task: str, threshold: float | None = None) -> dict[str, list]:
    """The output columns for a batch of model outputs (see the module docstring).

    A classifier with one output per row is binary: its output is a logit unless `threshold`
    is 0.5 (a probability, for BCELoss).
    """
    if task == "regression":
        values = outputs.squeeze(-1) if outputs.ndim > 1 and outputs.shape[-1] == 1 else outputs
        return {"prediction": values.tolist()}
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        scores = outputs.reshape(len(outputs))
        probability = scores if threshold == 0.5 else scores.sigmoid()
        return {"prediction": (probability > 0.5).long().tolist(), "probability": probability.tolist()}
    if outputs.ndim > 2:  # one class distribution per position
        return {"prediction": outputs.argmax(dim=-1).tolist()}
    return {"prediction": outputs.argmax(dim=-1).tolist(), "probabilities": outputs.softmax(dim=-1).tolist()}


def _write(columns: dict[str, list], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        pq.write_table(pa.table(columns), partial)
        os.replace(partial, out)  # never a half-written file under the name asked for
    finally:
        partial.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accelerated_trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory, {ckpt_dir}/{title}")
    parser.add_argument("--data", required=True, help="the rows to predict: a file (or glob) in a format data_files takes")
    parser.add_argument("--out", required=True, help="the parquet file to write, one row per input row")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a top/... path")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per forward (default: the run's eval_batch_size)")
    args = parser.parse_args(argv)
    try:
        rows = predict_file(args.run_dir, args.data, args.out, args.checkpoint, args.batch_size)
    except Exception as err:
        if not _is_bad_input(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {rows} predictions of {Path(args.run_dir) / args.checkpoint} to {args.out}")
    return 0


def _is_bad_input(err: Exception) -> bool:
    if isinstance(err, ConfigError):
        return True
    # Imported only here: these modules import torch.
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loss import ModelError

    return isinstance(err, (DataError, CheckpointError, ModelError))


if __name__ == "__main__":
    sys.exit(main())
