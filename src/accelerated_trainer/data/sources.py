"""Where rows come from: local files, save_to_disk directories, or datasets given in memory.

Everything becomes a `datasets.Dataset`: files through `load_dataset` (converted once to Arrow
in the datasets cache, then memory-mapped), directories through `load_from_disk`.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow as pa

from ..config import ConfigError, DatasetOptions, TextOptions

FORMATS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".txt": "text"}


class DataError(ValueError):
    """The data does not fit the config: a missing file or column, an empty split."""


def describe_files(options: DatasetOptions, split: str) -> str:
    return f"dataset_options.data_files.{split} ({options.data_files.get(split)!r})"


def as_dataset(data):
    """A datasets.Dataset from a Dataset, a dict of columns or a pyarrow Table."""
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, dict):
        # Tensors as numpy arrays: datasets stores them as lists of the row shape, like any array.
        return datasets.Dataset.from_dict({key: value.numpy(force=True) if hasattr(value, "numpy") and hasattr(value, "dim") else value
                                           for key, value in data.items()})
    if isinstance(data, pa.Table):
        return datasets.Dataset(data)
    raise TypeError(f"expected a datasets.Dataset, a dict of columns or a pyarrow Table, or torch data (a torch.utils.data "
                    f"Dataset, IterableDataset or DataLoader), got {type(data).__name__}")


def load_file_split(options: DatasetOptions, split: str):
    """The rows of `data_files[split]`: files of one format, or save_to_disk directories.

    Raises:
        ConfigError: the split has no entry in data_files.
        DataError: nothing matches, mixed formats, unreadable or empty data.
    """
    import datasets

    where = describe_files(options, split)
    if split not in options.data_files:
        raise ConfigError(
            f"{where}: no {split} data given; set dataset_options.data_files.{split} to a .parquet, .csv, .jsonl, "
            ".arrow or .txt path (or glob, or a save_to_disk directory), or pass train_dataset= to the trainer."
        )
    paths = _expand(options.data_files[split], where)
    directories = [path for path in paths if Path(path).is_dir()]
    if directories:
        if len(directories) != len(paths):
            raise DataError(f"{where}: give either files or save_to_disk directories, not both: {paths}.")
        parts = [_load_saved(path, split, where) for path in directories]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    else:
        dataset = _load_files(paths, split, where, options.text or TextOptions())
    if len(dataset) == 0:
        raise DataError(f"{where}: the {split} split is empty; check the files.")
    return dataset


def _expand(patterns: str | list[str], where: str) -> list[str]:
    paths = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern] * Path(pattern).exists()
        if not matched:
            raise DataError(f"{where}: no file matches {pattern!r} (relative to {Path.cwd()}); fix the path or glob.")
        paths += matched
    return paths


def _load_files(files: list[str], split: str, where: str, text: TextOptions):
    import datasets

    formats = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in formats or len(formats) > 1:
        raise DataError(f"{where}: files must all be one of {sorted(FORMATS)} by extension, got {files}.")
    builder = formats.pop()
    # Line breaks are kept so that the rows of a text file concatenate back to the file.
    kwargs = {"sample_by": text.sample_by, "keep_linebreaks": True} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
    except Exception as err:  # datasets raises ValueError, StopIteration or its own errors for unreadable files
        raise DataError(f"{where}: cannot read {files}: {type(err).__name__}: {err or 'no rows'}") from err


def _load_saved(path: str, split: str, where: str):
    import datasets

    try:
        saved = datasets.load_from_disk(path)
    except FileNotFoundError as err:
        raise DataError(f"{where}: {path} is a directory but not one written by save_to_disk ({err}).") from err
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{where}: {path} holds the splits {list(saved)}, not {split!r}.")
        return saved[split]
    return saved
