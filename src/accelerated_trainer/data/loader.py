"""Batches for training and validation: a DataLoader over whole batches in EpochSampler's order,
prepared by accelerate (sharded over processes, placed on device), or for one process reading
its own data an InProcessLoader. This module is the one place that chooses between them.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..config import ConfigError, DatasetOptions
from . import torch_data
from .batches import DTYPES, ColumnarBatches, RowByRow
from .in_process import InProcessLoader
from .padding import PaddedBatches
from .sampling import EpochSampler


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
    padding: dict[str, int] | None = None,
    with_labels: bool = True,
):
    """A DataLoader over `dataset` ready for `accelerator.prepare`.

    Training batches come in whole rounds over the processes (see EpochSampler); validation
    keeps every row once and leaves the padding to accelerate, whose gather_for_metrics drops it.
    With `in_process_device`, one process and the vectorized path without workers, the same
    batches come from an InProcessLoader instead, placed on that device and never prepared.
    Torch data (a torch_data.TorchSplit) gets torch_data's loaders; `padding` (token column ->
    pad value, from Splits.padding) pads each batch of tokenized rows to its longest row.
    Without `with_labels` the batches hold no `labels` (data to predict).

    Raises:
        ConfigError: a collate_fn with vectorization or torch data, or a dtypes key that is no batch key.
    """
    if collate_fn is not None and (options.vectorization or isinstance(dataset, torch_data.TorchSplit)):
        raise ConfigError("a custom collate_fn needs the per-row path: set dataset_options.vectorization to false (for "
                          "torch data, pass a DataLoader with your collate_fn as train_dataset instead).")
    dtypes = _dtypes(options, dataset)
    if isinstance(dataset, torch_data.TorchSplit):
        return torch_data.build_loader(dataset, options, dtypes={"labels": label_dtype, **dtypes}, batch_size=batch_size,
                                       seed=seed, train=train, num_processes=num_processes)
    if padding and not options.vectorization:
        raise ConfigError("dataset_options.vectorization: false has no per-row path for text classification (each batch is "
                          "padded as a whole); leave it true.")
    label_column = options.label_column if with_labels else None
    if padding:
        rows = PaddedBatches(dataset, label_column, label_dtype, padded=padding, max_length=options.text.max_length,
                             dtypes=dtypes, preload_max_bytes=options.preload_max_mb << 20)
    else:
        rows_class = ColumnarBatches if options.vectorization else RowByRow
        rows = rows_class(dataset, options.feature_columns, label_column, label_dtype,
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


def _dtypes(options: DatasetOptions, dataset) -> dict[str, torch.dtype]:
    """The configured dtype of each batch key, checked against the keys the batches hold."""
    if isinstance(dataset, torch_data.TorchSplit):
        keys = ["features"] * bool(dataset.layout.features) + list(dataset.layout.inputs) + ["labels"]
    else:
        keys = ["features"] * bool(options.feature_columns) + list(options.input_columns) + ["labels"]
    for key in options.dtypes:
        if key not in keys:
            raise ConfigError(f"dataset_options.dtypes: {key!r} is not a batch key; the batches hold {keys}.")
    dtypes = {key: DTYPES[name] for key, name in options.dtypes.items()}
    if options.text is not None and options.task in (None, "language_modeling"):  # token ids are class indices whatever the task says
        dtypes.setdefault("features", torch.long)
        dtypes.setdefault("labels", torch.long)
    return dtypes


def prepare(accelerator, model, optimizer, train_loader, eval_loader, *, prepare_model: bool = True):
    """accelerator.prepare for the model, the optimizer and the loaders, in one call (DeepSpeed
    reads the batch size from the loaders); an InProcessLoader is already in place, and a
    SkippingLoader (torch_data) keeps its place around its prepared DataLoader. Without
    `prepare_model` the model is left as it is (one sharded already)."""
    given = [loader for loader in (train_loader, eval_loader) if loader is not None and not isinstance(loader, InProcessLoader)]
    loaders = [loader.loader if isinstance(loader, torch_data.SkippingLoader) else loader for loader in given]
    if prepare_model:
        model, optimizer, *prepared = accelerator.prepare(model, optimizer, *loaders)
    else:
        optimizer, *prepared = accelerator.prepare(optimizer, *loaders)
    for outer, inner in zip(given, prepared):
        if isinstance(outer, torch_data.SkippingLoader):
            outer.loader = inner
    prepared = {id(outer): outer if isinstance(outer, torch_data.SkippingLoader) else inner for outer, inner in zip(given, prepared)}
    return model, optimizer, prepared.get(id(train_loader), train_loader), eval_loader and prepared.get(id(eval_loader), eval_loader)


def prepare_loader(accelerator, loader):
    """accelerate's prepare_data_loader for a loader build_loader made (evaluation's, later on):
    a SkippingLoader (torch_data) keeps its place around the prepared DataLoader."""
    if isinstance(loader, torch_data.SkippingLoader):
        loader.loader = accelerator.prepare_data_loader(loader.loader)
        return loader
    return accelerator.prepare_data_loader(loader)


def with_batch_transform(loader, transform: Callable[[dict], dict]):
    """The training loader with `transform` applied to each batch it yields (after placement)."""
    return TransformedBatches(loader, transform)


class TransformedBatches:
    """A loader whose batches pass through a function (dataset_options.train_batch_transform);
    everything else (set_epoch, len, sampler, dataset) is the loader's own."""

    def __init__(self, loader, transform: Callable[[dict], dict]):
        self.loader, self.transform = loader, transform

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return map(self.transform, self.loader)


def forward_inputs(model: torch.nn.Module | None) -> list[str]:
    """The names of a model's forward parameters after the first: they name the extra inputs of tuple items."""
    if model is None:
        return []
    parameters = list(inspect.signature(model.forward).parameters.values())
    return [p.name for p in parameters[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def batches_per_epoch(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without __len__
        return None
