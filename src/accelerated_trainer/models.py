"""Models for CLI runs: built-in ones by name, or any class by import path."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .config import ConfigError, ModelOptions
from .imports import import_object


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


class CharTransformer(nn.Module):
    """A small causal transformer language model (GPT-style, pre-norm) with tied embeddings.

    The output layer shares the token embedding matrix, which saves vocab_size x n_embd
    parameters and trains better at this size.

    Args:
        vocab_size: token ids are 0..vocab_size-1 (inferred from the data).
        block_size: the longest sequence, for the learned position embedding (from the data).
        n_layer / n_head / n_embd: depth, attention heads and width.
        dropout: dropout probability on embeddings, attention and residual branches.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 2, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        self.position_embedding = nn.Embedding(block_size, n_embd)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(_init_weights)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, positions) to next-token logits (batch, positions, vocab_size)."""
        length = features.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than block_size {self.block_size}")
        positions = torch.arange(length, device=features.device)
        x = self.dropout(self.token_embedding(features) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.norm1, self.norm2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))
        self.residual_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.residual_dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.mlp(self.norm2(x))


def _init_weights(module: nn.Module) -> None:
    # GPT-2's initialisation: small normal weights keep the tied embedding/output logits near uniform at start.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


BUILTIN = {"mlp": MLP, "char_transformer": CharTransformer}

# Constructor arguments of built-in models that the data decides: argument -> data_info key.
_FROM_DATA = {
    "mlp": {"input_dim": "input_dim", "output_dim": "num_classes"},
    "char_transformer": {"vocab_size": "vocab_size", "block_size": "block_size"},
}


def resolve(options: ModelOptions, data_info: dict[str, int]) -> ModelOptions:
    """The model options with everything the data decides filled in.

    Built-in models get their sizes from the data when the config omits them (mlp: input_dim,
    output_dim; char_transformer: vocab_size, block_size); the resolved options are saved with
    the run, so an exported model rebuilds without the data.

    Raises:
        ConfigError: a size given in the config is smaller than the data needs, or the data
            lacks what the model needs (e.g. mlp without feature_columns).
    """
    kwargs = dict(options.kwargs)
    for argument, key in _FROM_DATA.get(options.name, {}).items():
        needed, given = data_info.get(key, 1 if key == "num_classes" else None), kwargs.get(argument)  # regression: 1 output
        if needed is None and given is None:
            raise ConfigError(f"model_options: {options.name} takes {argument} from the data's {key}, which this data "
                              f"does not give ({data_info}); set model_options.kwargs.{argument}.")
        # Wider outputs and longer blocks than the data needs are fine; a different input width is not.
        if needed is not None and given is not None and (given != needed if key == "input_dim" else given < needed):
            raise ConfigError(f"model_options.kwargs.{argument} is {given} but the data has {key} {needed}; "
                              f"{'set it to' if key == 'input_dim' else 'raise it to at least'} {needed}, or leave it out "
                              "to take it from the data.")
        kwargs.setdefault(argument, needed)
    return options.model_copy(update={"kwargs": kwargs})


def build_model(options: ModelOptions) -> nn.Module:
    """Instantiate a model from resolved options."""
    cls = BUILTIN.get(options.name)
    if cls is None:
        if ":" not in options.name:
            raise ConfigError(f"model_options.name: {options.name!r} is neither a built-in model ({', '.join(BUILTIN)}) nor "
                              "an import path of the form package.module:Class.")
        cls = import_object(options.name, "model_options.name", kind="Class")
    try:
        inspect.signature(cls).bind(**options.kwargs)
        fits = True
    except TypeError as err:
        fits, problem = False, err
    # transformers classes are built from a config (Auto classes refuse a constructor call altogether).
    if hasattr(cls, "from_pretrained") and (not fits or not (isinstance(cls, type) and issubclass(cls, nn.Module))):
        raise ConfigError(
            f"model_options.name: {options.name!r} is a Hugging Face class, which is built from a model directory or a "
            "config: set model_options.pretrained to a local model directory (from_pretrained) or model_options.hf_config "
            f"to a config.json or its directory (random weights), with model_options.auto_class {cls.__name__!r} to use "
            "this class, and leave model_options.name out.")
    if not fits:
        raise ConfigError(f"model_options.kwargs do not fit {options.name} ({cls.__name__}{inspect.signature(cls)}): {problem}.")
    return cls(**options.kwargs)


def from_config(options: ModelOptions | None, task: str, data_info: dict, model_dir=None) -> tuple[nn.Module, ModelOptions]:
    """The model_options model and its resolved options: a built-in or imported class sized from
    the data, or a transformers model (hf.py; `model_dir` is its local directory, if any).

    Raises:
        ConfigError: no model_options, or options that do not fit the model or the data.
    """
    if options is None:
        raise ConfigError("model_options: no model given; set model_options.name (e.g. \"mlp\") or pass a model to the trainer.")
    from . import hf

    if hf.uses_transformers(options):
        return hf.build_model(options, task, data_info, model_dir)
    resolved = resolve(options, data_info)
    return build_model(resolved), resolved
