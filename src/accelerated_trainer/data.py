"""Datasets from local files or memory, and batches gathered column-wise from Arrow.

The vectorized path never builds per-row dicts: a batch sampler yields index lists, one Arrow
`take` per batch pulls the rows, and each column becomes one tensor. The DataLoader is handed
to `accelerator.prepare`, which shards the batches across processes and places them on device.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, Sampler

from .config import DatasetOptions, ConfigError

FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class DataError(ValueError):
    """The data does not fit the config: a missing file or column, an empty split."""


@dataclass
class Splits:
    train: Any  # datasets.Dataset
    validation: Any | None
    source: str  # where the data came from, for messages


def load_splits(options: DatasetOptions, seed: int, train_dataset=None, eval_dataset=None) -> Splits:
    """Load train and validation splits from the config's files, or take the given datasets.

    A dataset passed in overrides the config's file for that split; without a validation
    split, a seeded `validation_split` fraction of train is held out.
    """
    if train_dataset is not None:
        train, source = _as_dataset(train_dataset), "the train_dataset argument"
    else:
        train, source = _load_file_split(options, "train"), _describe_files(options, "train")
    validation = None
    if eval_dataset is not None:
        validation = _as_dataset(eval_dataset)
    elif train_dataset is None and "validation" in options.data_files:
        validation = _load_file_split(options, "validation")
    elif options.validation_split > 0:
        parts = train.train_test_split(test_size=options.validation_split, seed=seed)
        train, validation = parts["train"], parts["test"]
    splits = Splits(train=_flat(train), validation=validation and _flat(validation), source=source)
    for name, split in (("train", splits.train), ("validation", splits.validation)):
        if split is not None:
            _check_columns(split, options, name, source)
    return splits


def _flat(dataset):
    # Split/shuffled datasets keep an indices mapping; materialize it so Arrow `take` sees real rows.
    return dataset.flatten_indices() if dataset._indices is not None else dataset


def _as_dataset(data):
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, dict):
        return datasets.Dataset.from_dict(data)
    raise TypeError(f"expected a datasets.Dataset or a dict of columns, got {type(data).__name__}")


def _describe_files(options: DatasetOptions, split: str) -> str:
    return f"dataset_options.data_files.{split} ({options.data_files.get(split)!r})"


def _load_file_split(options: DatasetOptions, split: str):
    import datasets

    where = _describe_files(options, split)
    if split not in options.data_files:
        raise ConfigError(
            f"{where}: no {split} data given; set dataset_options.data_files.{split} to a .parquet, "
            ".csv or .jsonl path (or glob), or pass train_dataset= to the trainer."
        )
    patterns = options.data_files[split]
    patterns = [patterns] if isinstance(patterns, str) else patterns
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] * Path(pattern).is_file()
        if not matched:
            raise DataError(f"{where}: no file matches {pattern!r} (relative to {Path.cwd()}); fix the path or glob.")
        files += matched
    formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) > 1:
        raise DataError(f"{where}: files must all be one of {sorted(FORMATS)} by extension, got {files}.")
    try:
        dataset = datasets.load_dataset(formats.pop(), data_files={split: files}, split=split)
    except Exception as err:  # datasets raises ValueError, StopIteration or its own errors for unreadable files
        raise DataError(f"{where}: cannot read {files}: {type(err).__name__}: {err or 'no rows'}") from err
    if len(dataset) == 0:
        raise DataError(f"{where}: the {split} split is empty; check the files.")
    return dataset


def _check_columns(dataset, options: DatasetOptions, split: str, source: str) -> None:
    for column in [*options.feature_columns, options.label_column]:
        if column not in dataset.column_names:
            key = "label_column" if column == options.label_column else "feature_columns"
            raise DataError(
                f"dataset_options.{key}: column {column!r} is not in the {split} data from {source}; "
                f"its columns are {dataset.column_names}."
            )
    if len(dataset) == 0:
        raise DataError(f"the {split} split from {source} is empty.")


class ColumnarBatches(torch.utils.data.Dataset):
    """Rows of an Arrow table served a whole batch at a time.

    `__getitems__` is the hook torch's DataLoader calls with a batch's index list: one Arrow
    `take`, then one numpy view per column. `__getitem__` serves single rows for the
    per-row path (`vectorization: false`).
    """

    def __init__(self, dataset, feature_columns: list[str], label_column: str, label_dtype: torch.dtype):
        table = dataset.data.table.select([*feature_columns, label_column])
        self._table = table.combine_chunks()
        self._features = feature_columns
        self._label = label_column
        self._label_dtype = label_dtype

    def __len__(self) -> int:
        return self._table.num_rows

    def take(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = self._table.take(pa.array(indices, type=pa.int64()))
        return {"features": self._stack_features(rows), "labels": self._column(rows, self._label, self._label_dtype)}

    __getitems__ = take

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.take([index]).items()}

    def _stack_features(self, rows: pa.Table) -> torch.Tensor:
        if len(self._features) == 1:
            return self._column(rows, self._features[0], torch.float32)
        return torch.stack([self._column(rows, name, torch.float32) for name in self._features], dim=1)

    @staticmethod
    def _column(rows: pa.Table, name: str, dtype: torch.dtype) -> torch.Tensor:
        column = rows.column(name).combine_chunks()
        shape = [len(column)]
        while pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) or pa.types.is_large_list(column.type):
            flat = pc.list_flatten(column)
            shape.append(len(flat) // max(len(column), 1))
            column = flat
        # Arrow buffers are read-only; torch.tensor makes the one writable copy, cast included.
        return torch.tensor(column.to_numpy(zero_copy_only=False).reshape(shape), dtype=dtype)


class RowByRow(ColumnarBatches):
    """The per-row path: torch's fetcher asks for rows one by one and a collate function stacks them."""

    __getitems__ = None


class EpochSampler(Sampler[int]):
    """Row order as a pure function of (seed, epoch), from a position within the epoch.

    `start` is the number of samples of this epoch already consumed by all processes
    together: a resume serves the rest of the same permutation, which accelerate then shards
    over however many processes there are now, so no sample is repeated or skipped.

    With several processes the epoch is padded (with its own first rows) or, with drop_last,
    cut to whole rounds of `batch_size x processes`, so every process gets full batches. The
    sampler does this rather than accelerate's `even_batches`, which pads from wherever the
    iteration began and so would pad differently after a mid-epoch resume.
    """

    def __init__(self, num_rows: int, seed: int, shuffle: bool, round_size: int = 1, drop_last: bool = False):
        self.num_rows, self.seed, self.shuffle = num_rows, seed, shuffle
        self.round_size, self.drop_last = round_size, drop_last
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.num_rows))
        else:
            # SeedSequence mixes (seed, epoch): seed 43 epoch 0 is not seed 42 epoch 1.
            mixed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0])
            order = torch.randperm(self.num_rows, generator=torch.Generator().manual_seed(mixed)).tolist()
        length = self.epoch_length()
        return order[:length] if length <= len(order) else (order * -(-length // len(order)))[:length]

    def epoch_length(self) -> int:
        rounds = self.num_rows // self.round_size if self.drop_last else -(-self.num_rows // self.round_size)
        return self.num_rows if self.round_size == 1 and not self.drop_last else rounds * self.round_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation()[self.start:])

    def __len__(self) -> int:
        return self.epoch_length() - self.start


def _whole_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # __getitems__ already returns the finished batch; the default collate would re-stack it row by row.
    return batch


def build_loader(
    dataset,
    options: DatasetOptions,
    *,
    label_dtype: torch.dtype,
    batch_size: int,
    seed: int,
    train: bool,
    num_processes: int = 1,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` ready for `accelerator.prepare`.

    Training batches come in whole rounds over the processes (see EpochSampler); validation
    keeps every row once and leaves the padding to accelerate, whose gather_for_metrics drops it.
    """
    if options.vectorization and collate_fn is not None:
        raise ConfigError("a custom collate_fn needs the per-row path: set dataset_options.vectorization to false.")
    rows_class = ColumnarBatches if options.vectorization else RowByRow
    rows = rows_class(dataset, options.feature_columns, options.label_column, label_dtype)
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=EpochSampler(len(rows), seed, shuffle=train and options.shuffle,
                             round_size=batch_size * num_processes if train and num_processes > 1 else 1,
                             drop_last=train and options.drop_last),
        drop_last=train and options.drop_last and num_processes == 1,
        collate_fn=_whole_batch if options.vectorization else collate_fn,
        num_workers=options.num_workers,
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # so a mid-epoch resume sees the same dropout masks as the uninterrupted run.
        generator=torch.Generator().manual_seed(seed),
    )


def describe(dataset, options: DatasetOptions, task: str) -> dict[str, int]:
    """Feature width and, for classification, the number of classes: lets built-in models size themselves."""
    sample = ColumnarBatches(dataset, options.feature_columns, options.label_column, torch.float32)
    features = sample.take([0])["features"]
    info = {"input_dim": int(np.prod(features.shape[1:]))}
    if task == "classification":
        labels = dataset.data.table.column(options.label_column)
        info["num_classes"] = int(pc.max(labels).as_py()) + 1
    return info
