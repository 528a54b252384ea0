"""Datasets from local files or memory, preprocessed once, and batches gathered column-wise.

    load_splits   files or in-memory data (sources.py) -> transforms (batched datasets.map, cached)
                  -> text tokenized and packed into blocks (text.py) -> seeded hold-out -> checked splits
    build_loader  a DataLoader over whole batches (batches.py) in the order of EpochSampler (sampling.py),
                  or for one process without workers an InProcessLoader (in_process.py)
    describe      the sizes built-in models take from the data

The vectorized path never builds per-row dicts: the batch sampler yields index lists and each
batch key is one gather. The DataLoader is handed to `accelerator.prepare`, which shards the
batches across processes and places them on device.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, DatasetOptions
from ..loss import IGNORE_INDEX
from .batches import DTYPES, ColumnarBatches, RowByRow, _stacked_shape
from .in_process import InProcessLoader
from .sampling import EpochSampler
from .sources import FORMATS, DataError, as_dataset, describe_files, load_file_split
from .text import tokenize_and_pack

__all__ = ["FORMATS", "ColumnarBatches", "DataError", "EpochSampler", "InProcessLoader", "RowByRow", "Splits", "build_loader", "describe", "load_splits"]



@dataclass
class Splits:
    train: Any  # datasets.Dataset
    validation: Any | None
    source: str  # where the data came from, for messages
    test: Any | None = None


def load_splits(options: DatasetOptions, seed: int, train_dataset=None, eval_dataset=None) -> Splits:
    """Load train, validation and test splits from the config's files, or take the given datasets.

    A dataset passed in overrides the config's file for that split; without a validation
    split, a seeded `validation_split` fraction of train is held out. Transforms and text
    packing run here, so the trainer calls this under `main_process_first`: the main process
    fills the datasets cache, the others read it.

    Raises:
        ConfigError: no train data is given. DataError: the data does not fit the config.
    """
    raw, sources = {}, {}
    if train_dataset is not None:
        raw["train"], sources["train"] = as_dataset(train_dataset), "the train_dataset argument"
    else:
        raw["train"], sources["train"] = load_file_split(options, "train"), describe_files(options, "train")
    if eval_dataset is not None:
        raw["validation"], sources["validation"] = as_dataset(eval_dataset), "the eval_dataset argument"
    elif train_dataset is None and "validation" in options.data_files:
        raw["validation"], sources["validation"] = load_file_split(options, "validation"), describe_files(options, "validation")
    if train_dataset is None and "test" in options.data_files:
        raw["test"], sources["test"] = load_file_split(options, "test"), describe_files(options, "test")
    for name, split in raw.items():
        if len(split) == 0:
            raise DataError(f"the {name} split from {sources[name]} is empty.")
        raw[name] = _apply_transforms(split, options, name)
    if options.text is not None:
        raw = tokenize_and_pack(raw, options, sources)
    if "validation" not in raw and options.validation_split > 0:
        parts = raw["train"].train_test_split(test_size=options.validation_split, seed=seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
        sources["validation"] = f"a {options.validation_split:g} hold-out of {sources['train']}"
    for name, split in raw.items():
        raw[name] = _flat(split)
        _check_columns(raw[name], options, name, sources[name])
    return Splits(train=raw["train"], validation=raw.get("validation"), source=sources["train"], test=raw.get("test"))


def _flat(dataset):
    # Split/shuffled datasets keep an indices mapping; materialize it so Arrow `take` sees real rows.
    return dataset.flatten_indices() if dataset._indices is not None else dataset


def _apply_transforms(dataset, options: DatasetOptions, split: str):
    for transform in options.transforms:
        function = _import_function(transform.name)
        dataset = dataset.map(
            function, batched=True, batch_size=transform.batch_size, fn_kwargs=transform.kwargs or None,
            remove_columns=dataset.column_names if transform.remove_columns else None,
            num_proc=options.num_proc if options.num_proc > 1 else None, desc=f"{transform.name} on {split}")
    return dataset


def _import_function(path: str) -> Callable:
    module_name, sep, attr = path.partition(":")
    if not sep:
        raise ConfigError(f"dataset_options.transforms: {path!r} is not an import path of the form package.module:function.")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"dataset_options.transforms: cannot import {path!r}: {err}.") from None
    if not callable(function):
        raise ConfigError(f"dataset_options.transforms: {path!r} is not a function.")
    return function


def _check_columns(dataset, options: DatasetOptions, split: str, source: str) -> None:
    keys = [("feature_columns", options.feature_columns), ("input_columns", options.input_columns),
            ("label_column", [options.label_column])]
    for key, columns in keys:
        for column in columns:
            if column not in dataset.column_names:
                raise DataError(
                    f"dataset_options.{key}: column {column!r} is not in the {split} data from {source}; "
                    f"its columns are {dataset.column_names}."
                )
    if len(dataset) == 0:
        raise DataError(f"the {split} split from {source} is empty.")
    for key, columns in keys:
        for column in columns:
            _check_finite(dataset.data.table.column(column), f"dataset_options.{key}", column, split, source)


def _check_finite(column: pa.ChunkedArray, key: str, name: str, split: str, source: str) -> None:
    """NaN, inf or missing values in a numeric column: an error before training, not a NaN loss later."""
    count, first, offset = 0, None, 0
    for chunk in column.chunks:  # chunk by chunk: a memory-mapped column is never copied whole
        bad, width = _not_finite(chunk)
        found = 0 if bad is None else pc.sum(bad).as_py() or 0
        if found and first is None:
            first = offset + pc.index(bad, True).as_py() // width
        count, offset = count + found, offset + len(chunk)
    if count:
        raise DataError(
            f"{key}: column {name!r} of the {split} data from {source} has {count} NaN, infinite or missing "
            f"value(s), the first in row {first}; clean or impute them before training."
        )


def _not_finite(values: pa.Array) -> tuple[pa.Array | None, int]:
    """A mask of the chunk's NaN, infinite or missing numbers (lists flattened) and the values per row;
    None for non-numeric data and for missing lists, which the loader names itself."""
    rows = len(values)
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        if values.null_count:
            return None, 1
        values = pc.list_flatten(values)
    if not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
        return None, 1
    bad = pc.invert(pc.fill_null(pc.is_finite(values), False)) if pa.types.is_floating(values.type) else pc.is_null(values)
    return bad, max(len(values) // max(rows, 1), 1)


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
    in_process_device: torch.device | None = None,
) -> DataLoader | InProcessLoader:
    """A DataLoader over `dataset` ready for `accelerator.prepare`.

    Training batches come in whole rounds over the processes (see EpochSampler); validation
    keeps every row once and leaves the padding to accelerate, whose gather_for_metrics drops it.
    With `in_process_device`, one process and the vectorized path without workers, the same
    batches come from an InProcessLoader instead, placed on that device and never prepared.

    Raises:
        ConfigError: a collate_fn with vectorization, or a dtypes key that is no batch key.
    """
    if options.vectorization and collate_fn is not None:
        raise ConfigError("a custom collate_fn needs the per-row path: set dataset_options.vectorization to false.")
    keys = ["features"] * bool(options.feature_columns) + list(options.input_columns) + ["labels"]
    for key in options.dtypes:
        if key not in keys:
            raise ConfigError(f"dataset_options.dtypes: {key!r} is not a batch key; the batches hold {keys}.")
    dtypes = {key: DTYPES[name] for key, name in options.dtypes.items()}
    if options.text is not None:  # token ids are class indices whatever the task says
        dtypes.setdefault("features", torch.long)
        dtypes.setdefault("labels", torch.long)
    rows_class = ColumnarBatches if options.vectorization else RowByRow
    rows = rows_class(dataset, options.feature_columns, options.label_column, label_dtype,
                      input_columns=options.input_columns, dtypes=dtypes, preload_max_bytes=options.preload_max_mb << 20)
    sampler = EpochSampler(len(rows), seed, shuffle=train and options.shuffle,
                           round_size=batch_size * num_processes if train and num_processes > 1 else 1,
                           drop_last=train and options.drop_last)
    drop_last = train and options.drop_last and num_processes == 1
    if in_process_device is not None and num_processes == 1 and options.vectorization and options.num_workers == 0:
        return InProcessLoader(rows, sampler, batch_size, drop_last, in_process_device)
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=_whole_batch if options.vectorization else collate_fn,
        num_workers=options.num_workers,
        # Its own generator: creating an iterator then draws no number from the global RNG,
        # so a mid-epoch resume sees the same dropout masks as the uninterrupted run.
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------- sizes for built-in models


def describe(dataset, options: DatasetOptions, task: str, validation=None) -> dict[str, int]:
    """What built-in models size themselves from: input_dim (features per example), and for
    class labels num_classes; for language_modeling also vocab_size and block_size.

    The number of classes is the label feature's ClassLabel size when it has one, else the
    largest label + 1; `validation`, when given, must hold no label outside that range.

    Raises:
        DataError: a class label that is negative, not an integer, or outside the class range.
    """
    table = dataset.data.table
    info = {}
    if options.feature_columns:
        info["input_dim"] = int(np.prod(_stacked_shape(table, options.feature_columns)))
    if task in ("classification", "language_modeling"):
        info["num_classes"] = _num_classes(dataset, options.label_column, validation)
    if task == "language_modeling":
        info["vocab_size"] = info["num_classes"]
        if options.feature_columns:
            _, highest = _class_range(table.column(options.feature_columns[0]), options.feature_columns[0], "train")
            info["vocab_size"] = max(info["vocab_size"], highest + 1)
        info["block_size"] = int(np.prod(_stacked_shape(table, [options.label_column])))
    return info


def _num_classes(dataset, column: str, validation) -> int:
    feature = dataset.features[column]
    while hasattr(feature, "feature"):  # List(ClassLabel) for per-position labels
        feature = feature.feature
    declared = getattr(feature, "num_classes", None)
    _, highest = _class_range(dataset.data.table.column(column), column, "train")
    num_classes = declared or highest + 1
    for split, data in (("train", dataset), ("validation", validation)):
        if data is None:
            continue
        _, highest = _class_range(data.data.table.column(column), column, split)
        if highest >= num_classes:
            origin = f"its ClassLabel feature declares {declared}" if declared else "the training labels hold classes 0 to " \
                     f"{num_classes - 1}"
            raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds the class "
                            f"{highest}, outside the class range ({origin}).")
    return num_classes


def _class_range(values, column: str, split: str) -> tuple[int, int]:
    """(lowest, highest) class index in a label column, skipping IGNORE_INDEX; checks they are indices."""
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = pc.list_flatten(values)
    if pa.types.is_floating(values.type):
        if not pc.all(pc.equal(pc.floor(values), values)).as_py():
            raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds non-integer "
                            "values; class labels are indices 0..C-1 (for real-valued targets set training_options.task "
                            "to regression).")
    values = pc.filter(values, pc.not_equal(values, IGNORE_INDEX))
    extremes = pc.min_max(values)
    lowest, highest = extremes["min"].as_py(), extremes["max"].as_py()
    if lowest is None:
        return 0, -1
    if lowest < 0:
        raise DataError(f"dataset_options.label_column: column {column!r} of the {split} data holds the class {lowest:g}; "
                        f"class labels are indices 0..C-1 ({IGNORE_INDEX} marks a position to ignore).")
    return int(lowest), int(highest)
