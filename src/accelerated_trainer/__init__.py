"""accelerated-trainer: train any PyTorch model from one JSON config, on a laptop or a cluster.

Heavy modules (torch, accelerate, datasets) load on first use, so `train.py --help` and
config errors answer fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "AcceleratedTrainer": "trainer",
    "Trainer": "trainer",
    "TrainResult": "trainer",
    "TrainerConfig": "config",
    "ConfigError": "config",
    "load_config": "config",
    "DataError": "data",
    "export_model": "export",
    "load_exported": "export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
