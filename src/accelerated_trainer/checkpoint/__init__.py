"""Checkpoints: `last` (full resumable state), `previous`, `older`, `best` and the top-k by the
monitored metric.

    checkpointer  Checkpointer: when to save what, what a failed write does, resuming
    states        the registry {name: Stateful}: adapters for the model's weights and the RNG
    store         a full checkpoint directory: which state goes to which file
    sharded       a sharded checkpoint directory (FSDP2): every process writes its shards through
                  torch.distributed.checkpoint's safetensors storage, any number of processes reads them
    run_dir       the run directory: names, index, the run lock, finding a resumable checkpoint,
                  whether a fresh run may start (without torch), what changed since
    top_k         the top-k decision
    files         crash-consistent directories: temporary name, fsync, manifest, rename into place
    tensors       pickle-free tensor files: the safetensors writer, nested state as JSON + tensors
    async_writer  asynchronous saves: host staging buffers, the background write

The names below load on first use: the command line reads run_dir without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "Checkpointer": "checkpointer", "CheckpointError": "files", "INDEX": "run_dir", "RunDir": "run_dir",
    "RunSignature": "run_dir", "ModelState": "states", "Stateful": "states", "WEIGHTS": "store", "load_weights_dir": "store",
    "Entry": "top_k",
    "select_top_k": "top_k",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
