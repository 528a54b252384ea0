"""Train, validation and test splits from the config's files or datasets given in memory, with
transforms (batched datasets.map, cached), text packing and the seeded hold-out applied, checked
against the config's columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DatasetOptions
from ..imports import import_object
from .checks import check_columns
from .sources import DataError, as_dataset, describe_files, load_file_split
from .text import tokenize_and_pack


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
        # A test file without labels is no reason to refuse training: it is then only not scored.
        check_columns(raw[name], options, name, sources[name], require_labels=name != "test")
    return Splits(train=raw["train"], validation=raw.get("validation"), source=sources["train"], test=raw.get("test"))


def load_split(data, options: DatasetOptions, name: str, *, require_labels: bool = True, source: str | None = None):
    """One more split, prepared as load_splits prepares the others: a dataset to evaluate or predict.

    `data` is a datasets.Dataset, a dict of columns or a pyarrow Table; transforms and text
    packing run as for the training data. Without `require_labels` the label column may be missing.

    Raises:
        DataError: the data does not fit the config, is empty, or is text for the char tokenizer
            (its vocabulary comes from the training splits).
    """
    source = source or f"the dataset given to {name}()"
    dataset = as_dataset(data)
    if len(dataset) == 0:
        raise DataError(f"the {name} data from {source} is empty.")
    dataset = _apply_transforms(dataset, options, name)
    if options.text is not None and options.text.column in dataset.column_names:
        if options.text.tokenizer == "char":
            raise DataError(f"{source}: new text cannot be tokenized with the char tokenizer, whose characters come from the "
                            "training splits; give token blocks (input_ids, labels), or score the text as "
                            "dataset_options.data_files.test.")
        dataset = tokenize_and_pack({name: dataset}, options, {name: source})[name]
    dataset = _flat(dataset)
    check_columns(dataset, options, name, source, require_labels=require_labels)
    return dataset


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
