"""Checkpoints: `last` (full resumable state), `previous`, `best` and the top-k by the monitored metric.

    checkpointer  Checkpointer: policy and layout of last/previous/best/top
    top_k         the top-k decision
    files         crash-consistent directories: temporary name, fsync, manifest, rename into place
    tensors       pickle-free tensor files: the safetensors writer, nested state as JSON + tensors
    async_writer  asynchronous saves: host staging buffers, the background write
    rng           each process's RNG state as JSON
"""

from .checkpointer import INDEX, WEIGHTS, Checkpointer
from .files import CheckpointError
from .top_k import Entry, select_top_k

__all__ = ["INDEX", "WEIGHTS", "CheckpointError", "Checkpointer", "Entry", "select_top_k"]
