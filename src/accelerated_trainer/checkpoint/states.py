"""What a checkpoint holds: the run's resumable state as a registry {name: Stateful}.

Each entry follows torch's Stateful protocol (`state_dict()` / `load_state_dict(state)`), the
protocol torch.distributed.checkpoint consumes too. Optimizers, schedulers, grad scalers, the
training state and early stopping follow it already; the adapters here cover what does not:
the model's weights (gathered by accelerate, each storage once) and each process's RNG.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate.utils import DistributedType

from ..distributed import is_sharded

MODEL, OPTIMIZER, RNG, TRAINER = "model", "optimizer", "rng", "trainer"


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelState:
    """The model's weights as a flat dict of tensors, each storage once.

    Tied weights share one storage; they are stored under one name (the first in the model's
    state dict) and re-tied on load. Under FSDP and DeepSpeed, `state_dict` is collective:
    accelerate gathers the full weights onto the main process. A sharded model (DTensor
    parameters: FSDP2, torch's fully_shard) is gathered by torch.distributed.checkpoint's
    get_model_state_dict, whatever accelerate's state-dict setting, and loaded from full
    weights by every process keeping its shards.
    """

    def __init__(self, accelerator, model: torch.nn.Module):
        self.accelerator, self.model = accelerator, model
        # The model without its distributed wrapper, unwrapped once: accelerate's unwrap_model looks
        # up optional packages on every call (about 0.3 ms, twice per save; bench note in README).
        self.module = accelerator.unwrap_model(model)
        self.sharded = is_sharded(self.module)  # decided once: a model stays sharded or not for the run
        # Only DeepSpeed and accelerate's FSDP gather the weights in get_state_dict; for any other
        # model that is the unwrapped model's own state_dict.
        self._gathered_by_accelerate = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights on the main process ({} on the others under FSDP2)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return one_entry_per_storage(get_model_state_dict(self.module, options=options))
        if self._gathered_by_accelerate:
            return one_entry_per_storage(self.accelerator.get_state_dict(self.model))
        return one_entry_per_storage(self.module.state_dict())

    def write_pretrained_files(self, directory) -> None:
        """Write what loads the weights besides model.safetensors into a checkpoint directory:
        nothing here; a transformers model's config and tokenizer (hf.PretrainedModelState)."""

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load full weights (every process the same).

        Raises:
            KeyError: the weights do not fit the model (names missing or unexpected)."""
        missing, unexpected = load_weights(self.module, state_dict, sharded=self.sharded)
        if missing or unexpected:
            raise KeyError(f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


def one_entry_per_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without the names that alias a storage already listed (tied weights), contiguous."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        key = _alias_key(tensor)
        if key is None or key not in seen:
            seen.add(key)
            kept[name] = tensor if tensor.is_contiguous() else tensor.contiguous()
    return kept


def _alias_key(tensor: torch.Tensor) -> tuple | None:
    """Equal for two names of the same tensor memory (tied weights); None for empty tensors."""
    if hasattr(tensor, "to_local"):  # a DTensor: its local shard is what has memory
        tensor = tensor.to_local()
    if tensor.numel() == 0:
        return None
    return tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], sharded: bool = False) -> tuple[list[str], list[str]]:
    """Load weights stored one entry per storage; (missing, unexpected) names.

    A name the file lacks is not missing when it shares its storage with a name the file has:
    loading that one fills both (safetensors' load_model does the same). `sharded`: the model's
    parameters are DTensors, each process keeps its shards of the full weights.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(model, weights, options=options)
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    groups = defaultdict(set)
    for name, tensor in model.state_dict().items():
        groups[_alias_key(tensor) or name].add(name)
    aliased = {name for names in groups.values() if names & weights.keys() for name in names}
    return [name for name in missing if name not in aliased], list(unexpected)


class RNGState:
    """This process's python, numpy and torch (CPU and CUDA) random number generators, as JSON."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
            "torch": torch.get_rng_state().tolist(),
        }
        if torch.cuda.is_available():
            state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(state_dict["torch"], dtype=torch.uint8))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state_dict["cuda"]])
