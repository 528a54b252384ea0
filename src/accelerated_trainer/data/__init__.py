"""Datasets from local files or memory, preprocessed once, and batches gathered column-wise.

    load_splits   files or in-memory data (sources.py) -> transforms (batched datasets.map, cached)
                  -> text tokenized and packed into blocks (text.py) -> seeded hold-out -> checked
                  splits (splits.py, checks.py)
    build_loader  a DataLoader over whole batches (batches.py) in the order of EpochSampler
                  (sampling.py), or for one process without workers an InProcessLoader
                  (in_process.py); prepare hands them to accelerate (loader.py)
    load_split    one more split (to evaluate or predict), prepared like the others
    describe      the sizes built-in models take from the data (checks.py)

Plain torch data (Datasets, IterableDatasets, DataLoaders) is read by torch_data.py; tokenized
text rows for classification (text_classification.py) are padded per batch (padding.py).

The vectorized path never builds per-row dicts: the batch sampler yields index lists and each
batch key is one gather. The DataLoader is handed to `accelerator.prepare`, which shards the
batches across processes and places them on device.
"""

from . import sources
from .batches import ColumnarBatches, RowByRow
from .checks import describe, label_names
from .in_process import InProcessLoader
from .loader import batches_per_epoch, build_loader, forward_inputs, prepare, prepare_loader, with_batch_transform
from .padding import PaddedBatches
from .sampling import EpochSampler
from .sources import FORMATS, DataError
from .splits import Splits, load_split, load_splits
from .torch_data import TorchSplit

__all__ = ["FORMATS", "batches_per_epoch", "forward_inputs", "ColumnarBatches", "DataError", "EpochSampler", "InProcessLoader", "PaddedBatches", "RowByRow", "Splits",
           "TorchSplit", "build_loader", "describe", "label_names", "load_split", "load_splits", "prepare", "prepare_loader", "sources",
           "with_batch_transform"]
