"""Train, validation and test splits from the config's files or data given in memory, with
transforms (batched datasets.map, cached), text tokenization, text labels encoded as classes
and the seeded hold-out applied, checked against the config's columns.

In-memory data is columns (a datasets.Dataset, a dict of columns, a pyarrow Table) or torch
data (torch_data.py), split by split: a file named in data_files serves every split not given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..config import ConfigError, DatasetOptions
from ..imports import import_object
from . import columns, torch_data
from .checks import check_columns
from .sources import DataError, as_dataset, describe_files, load_file_split
from .text import tokenize_and_pack
from .text_classification import tokenize_rows

ARGUMENTS = {"train": "the train_dataset argument", "validation": "the eval_dataset argument"}


@dataclass
class Splits:
    train: Any  # datasets.Dataset, or torch_data.TorchSplit
    validation: Any | None
    source: str  # where the training data came from, for messages
    test: Any | None = None
    options: DatasetOptions | None = None  # the config's options with what the data decided filled in
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    padding: dict[str, int] | None = None  # text classification: batch key -> pad value, padded per batch


def load_splits(options: DatasetOptions, seed: int, train_dataset=None, eval_dataset=None,
                input_names: Sequence[str] = ()) -> Splits:
    """Load train, validation and test splits from the config's files, or take the given data.

    Data passed in replaces the config's file for that split only; without a validation split,
    a seeded `validation_split` fraction of train is held out (of map-style torch data too).
    Transforms and text tokenization run here, so the trainer calls this under
    `main_process_first`: the main process fills the datasets cache, the others read it.
    `input_names`: the model's forward parameters after the first (names for tuple items).

    Raises:
        ConfigError: no train data is given. DataError: the data does not fit the config.
    """
    raw, sources = _load(options, {"train": train_dataset, "validation": eval_dataset})
    options, raw = _layouts(options, raw, sources, input_names)
    padding = None
    if raw_columns := {name: split for name, split in raw.items() if not isinstance(split, torch_data.TorchSplit)}:
        for name, split in raw_columns.items():
            raw_columns[name] = _apply_transforms(split, options, name)
        if options.text is not None and options.task in (None, "language_modeling"):
            raw_columns = tokenize_and_pack(raw_columns, options, sources)
        elif options.text is not None:
            raw_columns, options, padding = tokenize_rows(raw_columns, options, sources)
        raw.update(_encode_text_labels(raw_columns, options, sources))
    if "validation" not in raw and options.validation_split > 0:
        _hold_out(raw, sources, options, seed)
    for name, split in raw.items():
        if isinstance(split, torch_data.TorchSplit):
            continue
        raw[name] = split = _flat(split)
        if not (options.feature_columns or options.input_columns):  # train was tuples: each split names its own
            where = f"{name} data from {sources[name]}"
            check = columns.resolve(options, columns.kinds_of_table(split.data.table.schema), where)
        else:
            check = options
        # A test file without labels is no reason to refuse training: it is then only not scored.
        check_columns(split, check, name, sources[name], require_labels=name != "test")
        options = check if name == "train" else options
    return Splits(train=raw["train"], validation=raw.get("validation"), source=sources["train"], test=raw.get("test"),
                  options=options, sources=sources, padding=padding)


def _load(options: DatasetOptions, given: dict) -> tuple[dict, dict]:
    raw, sources = {}, {}
    for name in ("train", "validation", "test"):
        if given.get(name) is not None:
            data, sources[name] = given[name], ARGUMENTS[name]
            raw[name] = data if torch_data.is_torch_data(data) else as_dataset(data)
        elif name == "train" or name in options.data_files:
            raw[name], sources[name] = load_file_split(options, name), describe_files(options, name)
        if name in raw and not torch_data.is_torch_data(raw[name]) and len(raw[name]) == 0:
            raise DataError(f"the {name} split from {sources[name]} is empty.")
    return raw, sources


def _layouts(options: DatasetOptions, raw: dict, sources: dict, input_names) -> tuple[DatasetOptions, dict]:
    """Torch splits as TorchSplits, with the options their items resolve (train's first)."""
    torch_splits = [name for name in raw if torch_data.is_torch_data(raw[name])]
    if not torch_splits:
        return options, raw
    if options.transforms or options.text is not None:
        key = "transforms" if options.transforms else "text"
        raise ConfigError(f"dataset_options.{key} work on columns of a datasets.Dataset, but {sources[torch_splits[0]]} is torch "
                          "data; tokenize or transform it in the dataset itself (or pass columns).")
    raw = dict(raw)
    for name in sorted(torch_splits, key=lambda name: name != "train"):
        data = raw[name]
        if torch_data.is_map_style(data) and len(data) == 0:
            raise DataError(f"the {name} split from {sources[name]} is empty.")
        layout, resolved = torch_data.layout_of(torch_data.first_batch(data), options, sources[name], input_names)
        if name == "train":
            options = resolved
            if size := torch_data.loader_batch_size(data):  # a user's DataLoader: its batch size wins
                options = options.model_copy(update={"batch_size": size})
        raw[name] = torch_data.TorchSplit(data, layout, sources[name])
    return options, raw


def _hold_out(raw: dict, sources: dict, options: DatasetOptions, seed: int) -> None:
    train = raw["train"]
    if isinstance(train, torch_data.TorchSplit):
        parts = train.hold_out(options.validation_split, seed)
        if parts is None:  # iterable data and DataLoaders have no rows to hold out
            return
        raw["train"], raw["validation"] = parts
    else:
        parts = train.train_test_split(test_size=options.validation_split, seed=seed)
        raw["train"], raw["validation"] = parts["train"], parts["test"]
    sources["validation"] = f"a {options.validation_split:g} hold-out of {sources['train']}"


def load_split(data, options: DatasetOptions, name: str, *, require_labels: bool = True, source: str | None = None,
               input_names: Sequence[str] = (), label_names: Sequence[str] | None = None):
    """One more split, prepared as load_splits prepares the others: a dataset to evaluate or predict.

    `data` is what train_dataset= takes: columns (a datasets.Dataset, a dict of columns, a
    pyarrow Table), whose transforms, text tokenization and text labels (`label_names`, the
    training data's classes) are applied as for the training data, or torch data with items
    shaped like the training items. Without `require_labels` the label column may be missing.

    Raises:
        DataError: the data does not fit the config, is empty, or is text for the char tokenizer
            (its vocabulary comes from the training splits).
    """
    source = source or f"the dataset given to {name}()"
    if torch_data.is_torch_data(data):
        layout, _ = torch_data.layout_of(torch_data.first_batch(data), options, source, input_names)
        return torch_data.TorchSplit(data, layout, source)
    dataset = as_dataset(data)
    if len(dataset) == 0:
        raise DataError(f"the {name} data from {source} is empty.")
    dataset = _apply_transforms(dataset, options, name)
    text = options.text
    if text is not None and options.task in (None, "language_modeling") and text.column in dataset.column_names:
        if text.tokenizer == "char":
            raise DataError(f"{source}: new text cannot be tokenized with the char tokenizer, whose characters come from the "
                            "training splits; give token blocks (input_ids, labels), or score the text as "
                            "dataset_options.data_files.test.")
        dataset = tokenize_and_pack({name: dataset}, options, {name: source})[name]
    elif text is not None and options.task not in (None, "language_modeling"):
        dataset = tokenize_rows({name: dataset}, options, {name: source})[0][name]
    if label_names and options.label_column in dataset.column_names:
        dataset = _encode_with(dataset, options.label_column, list(label_names), f"the {name} data from {source}")
    dataset = _flat(dataset)
    check_columns(dataset, options, name, source, require_labels=require_labels)
    return dataset


def _encode_with(dataset, label: str, names: list[str], where: str):
    """Text labels as the training data's class indices."""
    import datasets
    import pyarrow.types as types

    kind = dataset.data.table.schema.field(label).type
    if not (types.is_string(kind) or types.is_large_string(kind)):
        return dataset
    if unknown := sorted(set(dataset.unique(label)) - set(names), key=str):
        raise DataError(f"dataset_options.label_column: column {label!r} of {where} holds {unknown[:5]}, classes the training "
                        f"data does not have; the classes are {names}.")
    return dataset.cast_column(label, datasets.ClassLabel(names=names))


def _flat(dataset):
    # Split/shuffled datasets keep an indices mapping; materialize it so Arrow `take` sees real rows.
    return dataset.flatten_indices() if dataset._indices is not None else dataset


def _apply_transforms(dataset, options: DatasetOptions, split: str):
    for transform in options.transforms:
        function = import_object(transform.name, "dataset_options.transforms", kind="function")
        dataset = dataset.map(
            function, batched=True, batch_size=transform.batch_size, fn_kwargs=transform.kwargs or None,
            remove_columns=dataset.column_names if transform.remove_columns else None,
            num_proc=options.num_proc if options.num_proc > 1 else None, desc=f"{transform.name} on {split}")
    return dataset


def _encode_text_labels(splits: dict, options: DatasetOptions, sources: dict) -> dict:
    """Classification labels given as text ("positive", "negative") become class indices, with
    the class names (sorted, from train) kept in the label's ClassLabel feature."""
    import pyarrow.types as types

    label = options.label_column
    train = splits.get("train")
    if options.task != "classification" or train is None or label not in train.column_names:
        return splits
    kind = train.data.table.schema.field(label).type
    if not (types.is_string(kind) or types.is_large_string(kind)):
        return splits
    splits = {**splits, "train": train.class_encode_column(label)}
    classes = splits["train"].features[label]
    for name, split in splits.items():
        if name == "train" or label not in split.column_names:
            continue
        unknown = sorted(set(split.unique(label)) - set(classes.names), key=str)
        if unknown:
            raise DataError(f"dataset_options.label_column: column {label!r} of the {name} data from {sources[name]} holds "
                            f"{unknown[:5]}, classes the training data does not have; the classes are {classes.names}.")
        splits[name] = split.cast_column(label, classes)
    return splits
