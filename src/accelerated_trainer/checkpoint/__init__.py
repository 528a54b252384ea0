"""Checkpoints: `last` (full resumable state), `previous`, `best` and the top-k by the monitored metric.

    checkpointer  Checkpointer: when to save what, what a failed write does, resuming
    states        the registry {name: Stateful}: adapters for the model's weights and the RNG
    store         a full checkpoint directory: which state goes to which file
    run_dir       the run directory: names, index, finding a resumable checkpoint, what changed since
    top_k         the top-k decision
    files         crash-consistent directories: temporary name, fsync, manifest, rename into place
    tensors       pickle-free tensor files: the safetensors writer, nested state as JSON + tensors
    async_writer  asynchronous saves: host staging buffers, the background write
"""

from .checkpointer import Checkpointer
from .files import CheckpointError
from .run_dir import INDEX, RunDir, RunSignature
from .states import ModelState, Stateful
from .store import WEIGHTS, load_weights_dir
from .top_k import Entry, select_top_k

__all__ = ["INDEX", "WEIGHTS", "CheckpointError", "Checkpointer", "Entry", "ModelState", "RunDir", "RunSignature",
           "Stateful", "load_weights_dir", "select_top_k"]
