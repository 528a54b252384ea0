"""Models for CLI runs: built-in ones by name, or any class by import path."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from .config import ConfigError, ModelOptions


class MLP(nn.Module):
    """A multi-layer perceptron: flatten, [Linear, GELU, Dropout] per hidden layer, Linear.

    Args:
        input_dim: features per example (inferred from the data when the config leaves it out).
        output_dim: outputs; the number of classes for classification.
        hidden_dims: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
    """

    def __init__(self, input_dim: int, output_dim: int, hidden_dims: list[int] = (128,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


BUILTIN = {"mlp": MLP}


def resolve(options: ModelOptions, data_info: dict[str, int]) -> ModelOptions:
    """The model options with everything the data decides filled in.

    Built-in models get `input_dim` and `output_dim` from the data when the config omits them;
    the resolved options are saved with the run, so an exported model rebuilds without the data.
    """
    kwargs = dict(options.kwargs)
    if options.name in BUILTIN:
        kwargs.setdefault("input_dim", data_info["input_dim"])
        kwargs.setdefault("output_dim", data_info.get("num_classes", 1))
    return ModelOptions(name=options.name, kwargs=kwargs)


def build_model(options: ModelOptions) -> nn.Module:
    """Instantiate a model from resolved options."""
    cls = BUILTIN.get(options.name) or _import(options.name)
    try:
        inspect.signature(cls).bind(**options.kwargs)
    except TypeError as err:
        raise ConfigError(f"model_options.kwargs do not fit {options.name} ({cls.__name__}{inspect.signature(cls)}): {err}.") from None
    return cls(**options.kwargs)


def _import(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        raise ConfigError(
            f"model_options.name: {path!r} is neither a built-in model ({', '.join(BUILTIN)}) nor an import "
            "path of the form package.module:Class."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"model_options.name: cannot import module {module_name!r}: {err}.") from None
    if not hasattr(module, attr):
        raise ConfigError(f"model_options.name: module {module_name!r} has no attribute {attr!r}.")
    return getattr(module, attr)
