"""A full checkpoint: every registered state in one directory, written by the main process (the
store of unsharded models; sharded.py holds the store of sharded ones, and the parts both share
are at the end of this module).

    model.safetensors       the weights, each storage once (tied weights re-tied on load)
    optimizer.safetensors   the optimizer's tensors; optimizer.json the rest of its state
    state.json              every other state as JSON: the training state's keys at the top, the
                            others under their registry names (scheduler, early_stopping, ...)
    rng-rank{N}.json        each process's RNG (gathered on the main process when the state is taken)
    config.json, tokenizer  for a transformers model, what from_pretrained reads besides the weights
                            (ModelState.write_pretrained_files)

A save is taken in two parts. `capture` runs on the training thread of every process (gathering
the weights is collective under FSDP and DeepSpeed, so is gathering the RNG states): it
serializes everything but the parameters and the optimizer's tensors, which change only in the
optimizer step. `write` then runs on the main process, on the save thread for an asynchronous
save: it copies those tensors into staging buffers, calls `captured()` (the optimizer step may
go on), and writes every file from the copies; nothing of a save touches the disk on the
training thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from . import files, tensors
from .async_writer import Staging
from .files import CheckpointError
from .states import MODEL, OPTIMIZER, RNG, TRAINER, ModelState

WEIGHTS = "model.safetensors"
STATE = "state.json"
META = "meta.json"  # a weights directory's epoch, step and metrics
TENSOR_FILES = (WEIGHTS, f"{OPTIMIZER}.safetensors")  # the bulk of a checkpoint
_OWN_FILES = (MODEL, OPTIMIZER, RNG)  # states with files of their own; the rest go to state.json


def rng_file(process_index: int) -> str:
    return f"rng-rank{process_index}.json"


@dataclass
class Capture:
    """What a save writes, as taken on the training thread (the main process's; the others hold only their RNG)."""

    weights: dict[str, torch.Tensor]
    optimizer_skeleton: Any
    optimizer_tensors: dict[str, torch.Tensor]
    state_text: str
    rngs: dict[int, dict]  # every process's RNG, by process index
    model_state: Any = None  # writes the files that load the weights (ModelState.write_pretrained_files)
    asynchronous: bool = False  # the optimizer tensors and the `live` weights are still to copy
    live: set[str] = field(default_factory=set)


class FullStore:
    """Writes and reads full checkpoints of a registry {name: Stateful}: the main process writes them."""

    collective = False  # only the main process calls write()
    REWRITTEN_IN_PLACE = TENSOR_FILES  # a recycled slot keeps these files: overwritten in place (files.temporary_dir)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.staging = Staging()  # host buffers of asynchronous saves, kept from save to save

    def capture(self, states: dict, asynchronous: bool) -> Capture:
        """Take the state to save; every process calls it at the same point (collective: the
        weights under FSDP and DeepSpeed, and the processes' RNG, gathered on the main one).

        With `asynchronous`, the parameters and optimizer tensors are left live for `write` to
        copy; buffers (which a forward may update) are copied now.
        """
        model_weights = states[MODEL].state_dict()
        rngs = gather_rngs(self.accelerator, states)
        if not self.accelerator.is_main_process:
            return Capture({}, None, {}, "", {})
        weights = {name: tensors.host_tensor(value) if not asynchronous else value.detach() for name, value in model_weights.items()}
        skeleton, optimizer_tensors = tensors.split_tensors(states[OPTIMIZER].state_dict(), to_host=not asynchronous)
        live = set()
        if asynchronous:
            module = states[MODEL].module
            parameters = {p.data_ptr() for p in module.parameters()}
            buffers = {b.data_ptr() for b in module.buffers()}
            # Parameters are copied on the save thread; a gathered copy (FSDP, ZeRO-3) is no live tensor.
            live = {name for name, tensor in weights.items() if tensor.data_ptr() in parameters}
            for name in weights.keys() - live:
                weights[name] = tensors.host_tensor(weights[name], copy=weights[name].data_ptr() in buffers)
        return Capture(weights, skeleton, optimizer_tensors, json_state_text(states), rngs, states[MODEL], asynchronous, live)

    def write(self, capture: Capture, directory: Path, captured: Callable[[], None] = lambda: None,
              pause: float | Callable[[], float] = 0.0, prepare: Callable[[], None] = lambda: None) -> dict[str, str]:
        """Write the files (main process) into `directory`, which `prepare()` makes (empty, or a
        recycled slot keeping REWRITTEN_IN_PLACE); return their checksums for the seal.

        `captured()` is called once the live tensors are copied; `pause`: as for tensors.write_tensors.
        """
        weights, optimizer_tensors = capture.weights, capture.optimizer_tensors
        if capture.asynchronous:
            weights = {**weights, **self.staging.copy({name: weights[name] for name in capture.live}, MODEL)}
            optimizer_tensors = self.staging.copy(optimizer_tensors, OPTIMIZER)
        captured()
        prepare()
        checksums = write_rngs(directory, capture.rngs)
        checksums[WEIGHTS] = tensors.write_tensors(directory / WEIGHTS, weights, metadata={"format": "pt"}, pause=pause)
        checksums |= tensors.write_state(capture.optimizer_skeleton, optimizer_tensors, directory, OPTIMIZER, pause=pause)
        checksums[STATE] = files.write_text_file(directory / STATE, capture.state_text)
        capture.model_state.write_pretrained_files(directory)
        return checksums

    def read(self, directory: Path, states: dict) -> dict:
        """Load every registered state from a verified checkpoint; return what state.json held.

        A JSON state the checkpoint does not hold (early stopping switched on since) keeps its
        fresh value; so does the RNG of a process the checkpoint did not have. Into a sharded
        model (one process's checkpoint resumed on several), every process loads the whole
        state and keeps its shards.

        Raises:
            CheckpointError: the weights do not fit the model.
        """
        directory = Path(directory)
        try:
            states[MODEL].load_state_dict(load_file(str(directory / WEIGHTS), device="cpu"))
        except KeyError as err:
            raise CheckpointError(f"{directory / WEIGHTS} does not fit the model: {err.args[0]}.") from None
        optimizer_state = tensors.load_state(directory, OPTIMIZER)
        if states[MODEL].sharded:
            from .sharded import distribute_optimizer_state

            optimizer_state = distribute_optimizer_state(states[OPTIMIZER], optimizer_state)
        states[OPTIMIZER].load_state_dict(optimizer_state)
        return read_json_states(directory, states, self.accelerator.process_index)

    def release(self) -> None:
        """Free the staging buffers (after the last save of a run)."""
        self.staging.release()


# ---------------------------------------------------------------- what every store writes alike


def gather_rngs(accelerator, states: dict) -> dict[int, dict]:
    """Every process's RNG state by process index, on the main process (collective)."""
    if RNG not in states:
        return {}
    rng = states[RNG].state_dict()
    if accelerator.num_processes == 1:
        return {accelerator.process_index: rng}
    from accelerate.utils import gather_object

    return dict(gather_object([(accelerator.process_index, rng)]))


def json_state_text(states: dict) -> str:
    """state.json: the states without files of their own, the training state's keys at the top."""
    json_states = {}
    for name, state in states.items():
        if name not in _OWN_FILES:
            json_states.update(state.state_dict() if name == TRAINER else {name: state.state_dict()})
    return files.to_json(json_states, indent=None)  # one line: the C encoder (this runs at capture)


def write_rngs(directory: Path, rngs: dict[int, dict]) -> dict[str, str]:
    """Write each process's RNG file; their checksums by file name."""
    return {rng_file(index): files.write_json(directory / rng_file(index), rng, indent=None) for index, rng in rngs.items()}


def read_json_states(directory: Path, states: dict, process_index: int) -> dict:
    """Load state.json's states and this process's RNG into `states`; return what state.json held."""
    saved = files.read_json(directory / STATE)
    for name, state in states.items():
        if name == TRAINER:
            state.load_state_dict(saved)
        elif name not in _OWN_FILES and saved.get(name) is not None:
            state.load_state_dict(saved[name])
    own_rng = directory / rng_file(process_index)
    if RNG in states and own_rng.is_file():
        states[RNG].load_state_dict(files.read_json(own_rng))
    return saved


def write_weights_dir(dest: Path, weights: dict, meta: dict, model_state=None) -> None:
    """Weights alone (best/, top/*): model.safetensors and meta.json, with what `model_state`
    (a ModelState) writes to load them (a transformers model's config and tokenizer), sealed and published."""
    tmp = files.temporary_dir(dest)
    host = {name: tensors.host_tensor(value) for name, value in weights.items()}
    checksums = {WEIGHTS: tensors.write_tensors(tmp / WEIGHTS, host, metadata={"format": "pt"})}
    files.write_json(tmp / META, meta)
    if model_state is not None:
        model_state.write_pretrained_files(tmp)
    files.seal(tmp, checksums)
    files.publish(tmp, dest)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full weights of a checkpoint directory (CPU tensors by name): its model.safetensors, or
    its shards put together (a sharded `last`).

    Raises:
        CheckpointError: the directory holds neither.
    """
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return load_file(str(directory / WEIGHTS), device="cpu")
    from .sharded import is_sharded_checkpoint, read_full_weights

    if is_sharded_checkpoint(directory):
        return read_full_weights(directory)
    raise CheckpointError(f"{directory} holds no {WEIGHTS}.")


def load_weights_dir(directory: Path, model: ModelState) -> None:
    """Load the weights of a checkpoint directory (best/, top/..., last/, a sharded `last` too) into the model.

    The one reader of weights-only directories: restore_best and the predict command load
    through it.

    Raises:
        CheckpointError: the directory holds no weights, or they do not fit the model.
    """
    weights = read_weights(directory)
    try:
        model.load_state_dict(weights)
    except KeyError as err:
        raise CheckpointError(f"{directory} does not fit the model: {err.args[0]}.") from None
