"""Plain torch data from the Python API: map-style and iterable Datasets, and a user's DataLoader.

Items (or a user's batches) are dicts or tuples; a Layout maps them to the batch keys the
model call uses (`features`, the input columns by name, `labels`):

    dict items     the label_column key (or `labels`) is the label; feature_columns and
                   input_columns name keys, or the features are the other key(s) (columns.py)
    tuple items    (features, label), or (*inputs, label): the first input is `features`, the
                   others are named by input_columns or else by the model's forward parameters

How each kind is read, and what a mid-epoch resume does:

    map-style      a DataLoader over EpochSampler's order, like the package's own data: the
                   order is a function of (seed, epoch), a resume continues exactly where the
                   checkpoint was taken. A dataset with `__getitems__` is asked for a whole
                   batch in one call (torch's fetcher does so); it may return a list of items
                   or the batch itself (a dict or tuple of tensors).
    iterable       a DataLoader of the configured batch size; a resume reads and drops the
                   batches of the epoch already trained (accelerate's skip_first_batches), so
                   it continues exactly if the iterable yields the same items in each pass.
    DataLoader     used as given (its batch size, collate_fn, sampler and workers win) and
                   prepared by accelerate, whose seedable sampler makes a shuffled order a
                   function of (seed, epoch); a resume skips the batches already trained.

A datasets.Dataset with a `with_transform`/`set_transform` is read as a map-style dataset too:
its transform runs on every batch it serves (the column-wise gather would skip it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..config import DatasetOptions
from . import columns
from .sampling import EpochSampler
from .sources import DataError


def is_map_style(data) -> bool:
    return not isinstance(data, (DataLoader, IterableDataset))


def is_torch_data(data) -> bool:
    """Whether `data` is read as torch data: a torch Dataset or DataLoader, or a datasets.Dataset
    whose rows go through a transform."""
    return isinstance(data, (Dataset, DataLoader)) or getattr(data, "format", {}).get("type") == "custom"


@dataclass
class Layout:
    """Where each batch key is in an item: dict keys, or tuple positions."""

    kind: str  # "dict" or "tuple"
    features: list = field(default_factory=list)  # dict keys stacked into `features`, or [0]
    inputs: dict = field(default_factory=dict)  # batch key -> dict key or tuple position
    label: Any = None  # dict key, or -1
    input_dim: int | None = None  # features per example, for built-in models

    def batch(self, structure, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The batch dict of a batched structure (a dict or tuple of tensors with the rows first)."""
        batch = {}
        if self.features:
            parts = [structure[key] for key in self.features]
            features = parts[0] if len(parts) == 1 else torch.stack([part.float() for part in parts], dim=1)
            batch["features"] = features.to(dtypes.get("features", torch.float32 if features.is_floating_point() else features.dtype))
        for name, key in self.inputs.items():
            batch[name] = structure[key].to(dtypes[name]) if name in dtypes else structure[key]
        batch["labels"] = structure[self.label].to(dtypes["labels"])
        return batch

    def keys(self) -> list:
        return [*self.features, *self.inputs.values(), self.label]


class Collate:
    """collate_fn of the package's DataLoaders over torch data: items to the batch dict."""

    def __init__(self, layout: Layout, dtypes: dict[str, torch.dtype]):
        self.layout, self.dtypes = layout, dtypes

    def __call__(self, items) -> dict[str, torch.Tensor]:
        # A list is items (torch's convention, also for __getitems__); a dict or tuple is already a batch.
        structure = stack_items(items, self.layout.keys()) if isinstance(items, list) else as_tensors(items)
        return self.layout.batch(structure, self.dtypes)


class Convert:
    """What a user's DataLoader yields, as the batch dict (after accelerate placed it)."""

    def __init__(self, layout: Layout, dtypes: dict[str, torch.dtype]):
        self.layout, self.dtypes = layout, dtypes

    def __call__(self, batch) -> dict[str, torch.Tensor]:
        return self.layout.batch(as_tensors(batch), self.dtypes)


# ---------------------------------------------------------------- stacking items


def stack_items(items: list, keys: list | None = None):
    """Items (dicts or tuples) stacked key by key (only `keys`, when given) into one structure."""
    first = items[0]
    if isinstance(first, Mapping):
        return {key: _stack([item[key] for item in items], key) for key in (keys if keys is not None else first)}
    if isinstance(first, (tuple, list)):
        return tuple(_stack([item[i] for item in items], i) for i in range(len(first)))
    raise DataError(f"torch data items must be dicts or tuples (features, label); got {type(first).__name__}.")


def as_tensors(batch):
    if isinstance(batch, Mapping):
        return {key: value if isinstance(value, torch.Tensor) else _stack(value, key) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(value if isinstance(value, torch.Tensor) else _stack(value, i) for i, value in enumerate(batch))
    raise DataError(f"a DataLoader given to the trainer must yield dicts or tuples of tensors; it yields {type(batch).__name__}.")


def _stack(values, key) -> torch.Tensor:
    if isinstance(values, Sequence) and values and isinstance(values[0], torch.Tensor):
        try:
            return torch.stack(list(values))
        except RuntimeError as err:
            raise DataError(f"item {key!r} of the torch data holds tensors of different shapes ({err}); pad them to "
                            "one shape in the dataset, or pass a DataLoader with a collate_fn that does.") from None
    try:
        array = np.asarray(values)
    except ValueError:
        array = np.asarray([], dtype=object)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise DataError(f"item {key!r} of the torch data does not stack into a tensor of numbers (rows of different "
                        "shapes, or text); turn it into numbers of one shape in the dataset.")
    return torch.from_numpy(array)


# ---------------------------------------------------------------- the layout of a split


def first_batch(data):
    """A batch of one row (for a DataLoader, its first batch) as a dict or tuple of tensors; what
    does not stack into a tensor (text, ragged rows) is left as it is: it can only be left out."""
    if isinstance(data, DataLoader):
        batch = next(iter(data))
    else:
        getitems = None if isinstance(data, IterableDataset) else getattr(data, "__getitems__", None)
        items = [next(iter(data))] if isinstance(data, IterableDataset) else getitems([0]) if getitems else [data[0]]
        batch = _transpose(items) if isinstance(items, list) else items
    if isinstance(batch, Mapping):
        return {key: _stacked_or_as_is(value, key) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(_stacked_or_as_is(value, i) for i, value in enumerate(batch))
    raise DataError(f"torch data must yield dicts or tuples (features, label); it yields {type(batch).__name__}.")


def _transpose(items: list):
    """Items as one structure of value lists: a dict of lists, or a tuple of lists."""
    first = items[0]
    if isinstance(first, Mapping):
        return {key: [item[key] for item in items] for key in first}
    if isinstance(first, (tuple, list)):
        return tuple([item[i] for item in items] for i in range(len(first)))
    raise DataError(f"torch data items must be dicts or tuples (features, label); got {type(first).__name__}.")


def _stacked_or_as_is(values, key):
    if isinstance(values, torch.Tensor):
        return values
    try:
        return _stack(values, key)
    except DataError:
        return values


def layout_of(batch, options: DatasetOptions, source: str, input_names: Sequence[str] = ()) -> tuple[Layout, DatasetOptions]:
    """The Layout of a batch of the split, and the options with dict keys resolved as columns.

    `input_names`: the model's forward parameters after the first, which name the extra inputs
    of tuple items when input_columns does not.

    Raises:
        DataError: no label, a key the config names is missing, or the features are unclear.
    """
    if isinstance(batch, Mapping):
        return _dict_layout(batch, options, source)
    if len(batch) < 2:
        raise DataError(f"the items of {source} are tuples of {len(batch)}; give (features, label) or (*inputs, label).")
    extra = len(batch) - 2
    names = list(options.input_columns) if len(options.input_columns) == extra else list(input_names)[:extra]
    if len(names) < extra or "labels" in names or "features" in names:
        raise DataError(f"the items of {source} are tuples of {len(batch)}: (features, {extra} more input(s), label); name the "
                        f"inputs after the first in dataset_options.input_columns ({extra} names: they are passed to the model as "
                        "keyword arguments), or give dict items.")
    layout = Layout("tuple", features=[0], inputs={name: i + 1 for i, name in enumerate(names)}, label=-1)
    layout.input_dim = _input_dim(batch[0])
    return layout, options


def _dict_layout(batch: Mapping, options: DatasetOptions, source: str) -> tuple[Layout, DatasetOptions]:
    label = options.label_column
    if label not in batch and label == "label" and "labels" in batch:
        label = "labels"  # the key transformers models take
    if label not in batch:
        raise DataError(f"dataset_options.label_column: the items of {source} have no key {label!r}; their keys are "
                        f"{list(batch)}.")
    options = options.model_copy(update={"label_column": label})
    kinds = {key: _kind(value) for key, value in batch.items()}
    options = columns.resolve(options, kinds, f"items of {source}")
    for key, names in (("feature_columns", options.feature_columns), ("input_columns", options.input_columns),
                       ("label_column", [label])):
        for name in names:
            if name not in batch:
                raise DataError(f"dataset_options.{key}: the items of {source} have no key {name!r}; their keys are {list(batch)}.")
            if not isinstance(batch[name], torch.Tensor):
                raise DataError(f"dataset_options.{key}: key {name!r} of the items of {source} does not stack into a tensor "
                                "of numbers; turn it into numbers of one shape in the dataset.")
    layout = Layout("dict", features=list(options.feature_columns), inputs={name: name for name in options.input_columns},
                    label=label)
    if options.feature_columns:
        parts = [batch[key] for key in options.feature_columns]
        layout.input_dim = _input_dim(parts[0]) * len(parts)
    return layout, options


def _kind(value) -> str:
    if not isinstance(value, torch.Tensor) or value.dtype.is_complex:
        return columns.OTHER
    return columns.SCALAR if value.ndim == 1 else columns.ARRAY


def _input_dim(features) -> int | None:
    return int(np.prod(features.shape[1:])) if isinstance(features, torch.Tensor) else None


# ---------------------------------------------------------------- splits and loaders


@dataclass
class TorchSplit:
    """One split of torch data and how its items map to the batch keys."""

    data: Any  # a map-style Dataset, an IterableDataset or a DataLoader
    layout: Layout
    source: str

    @property
    def num_rows(self) -> int | None:
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        try:
            return len(dataset)
        except TypeError:  # an IterableDataset without __len__
            return None

    @property
    def is_map_style(self) -> bool:
        return is_map_style(self.data)

    def hold_out(self, fraction: float, seed: int) -> tuple["TorchSplit", "TorchSplit"] | None:
        """A seeded (train, validation) split of a map-style dataset; None for the other kinds."""
        if not self.is_map_style:
            return None
        n = len(self.data)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        held = max(1, int(np.ceil(fraction * n)))
        validation = TorchSplit(Subset(self.data, order[:held]), self.layout, f"a {fraction:g} hold-out of {self.source}")
        return TorchSplit(Subset(self.data, order[held:]), self.layout, self.source), validation


def build_loader(split: TorchSplit, options: DatasetOptions, *, dtypes: dict[str, torch.dtype], batch_size: int, seed: int,
                 train: bool, num_processes: int):
    """A DataLoader over a map-style split in EpochSampler's order, or a SkippingLoader for the rest."""
    if isinstance(split.data, DataLoader):
        return SkippingLoader(split.data, Convert(split.layout, dtypes), samples_per_batch=batch_size * num_processes)
    generator = torch.Generator().manual_seed(seed)
    collate = Collate(split.layout, dtypes)
    if not split.is_map_style:
        loader = DataLoader(split.data, batch_size=batch_size, collate_fn=collate, num_workers=options.num_workers,
                            generator=generator, drop_last=train and options.drop_last)
        return SkippingLoader(loader, None, samples_per_batch=batch_size * num_processes)
    sampler = EpochSampler(len(split.data), seed, shuffle=train and options.shuffle,
                           round_size=batch_size * num_processes if train and num_processes > 1 else 1,
                           drop_last=train and options.drop_last)
    return DataLoader(split.data, batch_size=batch_size, sampler=sampler, drop_last=train and options.drop_last and num_processes == 1,
                      collate_fn=collate, num_workers=options.num_workers, generator=generator)


def loader_batch_size(data) -> int | None:
    """The per-process batch size of a user's DataLoader, when it has one; None for other data."""
    if not isinstance(data, DataLoader):
        return None
    return data.batch_size or getattr(data.batch_sampler, "batch_size", None)


class SkippingPosition:
    """Where an epoch of a SkippingLoader is: `start` samples (all processes) already trained."""

    def __init__(self, num_rows: int | None):
        self.num_rows, self.start = num_rows, 0

    def set_epoch(self, epoch: int) -> None:
        pass


class SkippingLoader:
    """A loader whose order the package does not choose; a resumed epoch skips its first batches.

    Args:
        loader: the DataLoader (replaced by its prepared one in `prepare`).
        convert: turns each of its batches into the batch dict, or None if it yields them already.
        samples_per_batch: what one batch counts in TrainingState.samples_in_epoch.
    """

    def __init__(self, loader: DataLoader, convert: Convert | None, samples_per_batch: int):
        self.loader, self.convert, self.samples_per_batch = loader, convert, samples_per_batch
        dataset = loader.dataset
        self.sampler = SkippingPosition(len(dataset) if hasattr(dataset, "__len__") else None)

    @property
    def dataset(self):
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):  # the prepared loader: accelerate's seedable sampler, datasets' shuffling
            self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        loader = self.loader
        if skip := self.sampler.start // self.samples_per_batch:
            from accelerate import skip_first_batches

            loader = skip_first_batches(loader, skip)
        return iter(loader) if self.convert is None else map(self.convert, loader)
