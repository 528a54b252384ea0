"""A sharded checkpoint: every process writes its own shards, pickle-free, and any number of
processes reads them. The store of models whose parameters are DTensors (FSDP2's fully_shard);
the Checkpointer seals and publishes its directories like a full checkpoint's (store.py).

    shard-00001-model-00001-of-00001.safetensors   process 0's shards of the model's and the
                                                    optimizer's tensors (DCP's names: rank + 1)
    shard-00002-model-00001-of-00001.safetensors   process 1's, ...
    optimizer.json      the optimizer's other values by flattened key (param_groups.<fqn>.lr, ...)
    sharded.json        the format, how many processes wrote it, its shard files
    state.json, rng-rank{N}.json, a transformers model's config and tokenizer: as in a full checkpoint

The tensors go through torch.distributed.checkpoint (DCP) with its safetensors storage: each
shard file holds the offsets of its pieces in its header, and a load reads whatever overlaps
the current layout, so a checkpoint written by N processes resumes on M (on one process into
a plain model too). DCP's default FileSystemWriter pickles its `.metadata`; the safetensors
reader rebuilds that metadata from the headers instead, so nothing here is pickled.

A save runs on every process, like the full store's in two parts: `capture` on the training
thread, then `write`, on the save thread for an asynchronous save. `write` copies the process's
shards into host buffers (DCP's DefaultStager, kept from save to save), calls `captured()`,
waits for the main process to make the directory, writes its shard file through DCP (its CRC32
summed while the bytes go out), and gathers every process's sums on the main process, which
writes the JSON files and returns the sums for the one manifest. DCP's and these collectives
run on a gloo group of the store's own, so that the save thread's never interleave with the
training thread's (under NCCL a CPU group is what a save off the training thread needs).
"""

from __future__ import annotations

import math
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import files, tensors
from .files import CheckpointError
from .states import MODEL, OPTIMIZER
from .store import json_state_text, read_json_states, write_rngs

SHARDED = "sharded.json"
FORMAT = "dcp-safetensors"
SHARD_SUFFIX = ".safetensors"
OPTIMIZER_VALUES = f"{OPTIMIZER}.json"
# Checkpoint keys: model tensors by FQN, optimizer tensors by DCP's flattened key (state.<fqn>.exp_avg).
MODEL_PREFIX, OPTIMIZER_PREFIX = "model.", "optimizer."
# One process without a process group is a use this module intends (a resume on one CPU, the
# export of a sharded `last`); DCP warns at each save and load that it assumes so.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, assuming the intent")


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / SHARDED).is_file()


@dataclass
class ShardedCapture:
    """What a sharded save writes, as taken on the training thread."""

    tensors: dict[str, torch.Tensor]  # the live model and optimizer tensors (local shards as DTensors)
    optimizer_text: str  # optimizer.json (main process; "" elsewhere)
    state_text: str  # state.json (main process)
    rngs: dict[int, dict]  # every process's RNG (main process)
    model_state: Any  # writes the files that load the weights (ModelState.write_pretrained_files)
    asynchronous: bool


class ShardedStore:
    """Writes and reads sharded checkpoints of a registry {name: Stateful} whose model is sharded."""

    collective = True  # every process calls write()
    REWRITTEN_IN_PLACE = ()  # DCP truncates the files it writes: a recycled slot keeps none

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self._group = None  # the gloo group of the save's collectives, made by the first save
        self._stager = None

    def capture(self, states: dict, asynchronous: bool) -> ShardedCapture:
        """Take the state to save; every process calls it at the same point (collective).

        The model's and optimizer's tensors are left live for `write` (the parameters and the
        optimizer state change only in the optimizer step); buffers, which a forward may
        update, are copied now for an asynchronous save.

        Raises:
            CheckpointError: before the optimizer's first step (see _saveable_state).
        """
        from .store import gather_rngs

        live, scalars = _saveable_state(states[MODEL].module, states[OPTIMIZER])
        if asynchronous:
            buffers = {key for key, value in live.items() if key.startswith(MODEL_PREFIX) and not _is_dtensor(value)}
            live = {key: tensors.host_tensor(value, copy=True) if key in buffers else value for key, value in live.items()}
        rngs = gather_rngs(self.accelerator, states)
        self._side_group()  # collective, at the first save
        main = self.accelerator.is_main_process
        # tensors.split_tensors keeps tuples (betas) tuples, and refuses what JSON cannot hold.
        optimizer_text = files.to_json(tensors.split_tensors(scalars)[0]) if main else ""
        state_text = json_state_text(states) if main else ""
        return ShardedCapture(live, optimizer_text, state_text, rngs, states[MODEL], asynchronous)

    def write(self, capture: ShardedCapture, directory: Path, captured: Callable[[], None] = lambda: None,
              pause: float | Callable[[], float] = 0.0, prepare: Callable[[], None] = lambda: None) -> dict[str, str] | None:
        """Write this process's shards into `directory`, which `prepare()` makes on the main
        process; return every process's checksums on the main process (for the seal), None on
        the others. Every process calls it, at the same point.

        `captured()` is called once the live tensors are copied; `pause`: as for tensors.write_tensors.

        Raises:
            CheckpointError: on every process, when any process failed.
        """
        main = self.accelerator.is_main_process
        live, error = capture.tensors, None
        try:
            if capture.asynchronous:
                live = self._stager_for_run().stage(live)
        except Exception as err:  # out of memory: reported like a failed write, after the agreement
            error = _failed(err)
        finally:
            captured()
        if main and error is None:
            error = _attempt(prepare)
        _raise_if_any(_all_gather(error, self._group))  # no process writes before the directory is there
        writer = _writer(directory, pause)
        error = _attempt(lambda: dcp.save(live, storage_writer=writer, process_group=self._group))
        if error is None and main:
            error = _attempt(lambda: self._write_json(capture, directory))
        reports = _all_gather((error, None if error else _own_files(directory, writer)), self._group)
        _raise_if_any([error for error, _ in reports])
        return _checksums(directory, [own for _, own in reports]) if main else None

    def _write_json(self, capture: ShardedCapture, directory: Path) -> None:
        write_rngs(directory, capture.rngs)
        (directory / OPTIMIZER_VALUES).write_text(capture.optimizer_text)
        (directory / "state.json").write_text(capture.state_text)
        capture.model_state.write_pretrained_files(directory)

    def read(self, directory: Path, states: dict) -> dict:
        """Load every registered state from a verified sharded checkpoint onto the current layout
        (any number of processes; one process without a process group into a plain model too);
        return what state.json held. Every process calls it, on the training thread.

        Raises:
            CheckpointError: the directory holds safetensors files it does not list, or its
                tensors do not fit the model and optimizer.
        """
        directory = Path(directory)
        if reason := _unlisted_files(directory):
            raise CheckpointError(reason)
        model, optimizer = states[MODEL].module, _unwrapped(states[OPTIMIZER])
        live, _ = _state(model, optimizer)  # a fresh optimizer gets its state here (a zero-lr step)
        reader = HuggingFaceStorageReader(str(directory))
        _check_fits(directory, reader.read_metadata(), live)
        dcp.load(live, storage_reader=reader)  # into the live tensors, each process its part
        scalars = tensors.join_tensors(files.read_json(directory / OPTIMIZER_VALUES), {})
        model_state = {key[len(MODEL_PREFIX):]: value for key, value in live.items() if key.startswith(MODEL_PREFIX)}
        optimizer_state = {key[len(OPTIMIZER_PREFIX):]: value for key, value in live.items() if key.startswith(OPTIMIZER_PREFIX)}
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict={**optimizer_state, **scalars},
                       options=_options())
        return read_json_states(directory, states, self.accelerator.process_index)

    def release(self) -> None:
        """Free the host buffers (after the last save of a run)."""
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _side_group(self):
        if self._group is None and dist.is_initialized() and dist.get_world_size() > 1:
            handler = getattr(self.accelerator, "init_handler", None)  # experiment_options.distributed_timeout_s
            self._group = dist.new_group(backend="gloo", timeout=getattr(handler, "timeout", None))
        return self._group

    def _stager_for_run(self):
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            on_gpu = torch.cuda.is_available()
            # Synchronous on the save thread; pinned on a GPU, so the device-to-host copy runs at full speed.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=False))
        return self._stager


# ---------------------------------------------------------------- the state


def _options() -> StateDictOptions:
    # Flattened: the optimizer state keyed by parameter FQN, which resharding needs, its tensors
    # and its scalars separate entries (the tensors to DCP, the scalars to JSON).
    return StateDictOptions(flatten_optimizer_state_dict=True)


def _unwrapped(optimizer):
    """The torch optimizer itself. DCP's get/set_state_dict may take a zero-lr step on it; through
    accelerate's AcceleratedOptimizer that step also runs the fp16 grad scaler and corrupts its
    state (accelerate #4289)."""
    from accelerate.optimizer import AcceleratedOptimizer

    return optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, scalars): the live model and optimizer tensors by checkpoint key (local shards as
    DTensors), and the optimizer's other values by their flattened key."""
    model_state, optimizer_state = get_state_dict(model, _unwrapped(optimizer), options=_options())
    live, scalars = {}, {}
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"the model's state entry {key} is a {type(value).__name__}; a sharded checkpoint stores tensors only")
        live[MODEL_PREFIX + key] = value
    for key, value in optimizer_state.items():
        if isinstance(value, torch.Tensor):
            live[OPTIMIZER_PREFIX + key] = value
        else:
            scalars[key] = value
    return live, scalars


def _saveable_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """_state for a save, refused before the optimizer's first step.

    Before it, get_state_dict fills the empty state with a zero-lr step (Adam: step 1, zero
    moments), which would make the run after the save differ from the run without it. The
    state it created is dropped again (that step changed no parameter), and the save refused.

    Raises:
        CheckpointError: on every process alike (they all hold the same empty state).
    """
    torch_optimizer = _unwrapped(optimizer)
    had_state = bool(torch_optimizer.state)
    state = _state(model, torch_optimizer)
    if not had_state and torch_optimizer.state:
        torch_optimizer.state.clear()
        raise CheckpointError("a sharded checkpoint was asked for before the optimizer's first step; it is saved after a step")
    return state


def distribute_optimizer_state(optimizer, state: dict) -> dict:
    """A full optimizer state (a full checkpoint's, by parameter index) with every tensor of a
    parameter's shape cut to that parameter's shards, for a sharded optimizer to load. Every
    process holds the same full state: each keeps its part, without communication."""
    from torch.distributed.tensor import distribute_tensor

    parameters = [p for group in _unwrapped(optimizer).param_groups for p in group["params"]]
    distributed = {}
    for index, entry in state["state"].items():
        parameter = parameters[index]
        if not _is_dtensor(parameter):
            distributed[index] = entry
            continue
        distributed[index] = {
            key: distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape else value
            for key, value in entry.items()}
    return {**state, "state": distributed}


# ---------------------------------------------------------------- writing


class _SummingStream:
    """A file DCP writes into, whose CRC32 is summed while the bytes go to the file, paced like
    tensors.write_tensors (`pace()` is asked before each piece)."""

    def __init__(self, stream, pace: Callable[[], float]):
        self._stream, self._pace, self.crc, self.size = stream, pace, 0, 0

    def write(self, data) -> int:
        import time

        view = memoryview(data).cast("B")
        # zlib.crc32 and the write both release the GIL: flat out, each piece is summed while it is written.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32") as pool:
            for start in range(0, len(view), tensors.PACED_PIECE):
                piece, began = view[start:start + tensors.PACED_PIECE], time.perf_counter()
                if factor := self._pace():
                    self._stream.write(piece)
                    self.crc = zlib.crc32(piece, self.crc)
                    time.sleep(factor * (time.perf_counter() - began))
                    continue
                summed = pool.submit(zlib.crc32, piece, self.crc)
                self._stream.write(piece)
                self.crc = summed.result()
        self.size += len(view)
        return len(view)

    def __getattr__(self, name):  # tell, flush, fileno (DCP fsyncs), close
        return getattr(self._stream, name)


class _SummingFileSystem(FileSystem):
    """DCP's local file system, recording the CRC32 and length of each file it writes."""

    def __init__(self, pace: Callable[[], float]):
        super().__init__()
        self.pace = pace
        self.written: dict[str, tuple[int, int]] = {}

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            summing = _SummingStream(stream, self.pace)
            yield summing
        self.written[Path(path).name] = (summing.crc, summing.size)


def _writer(directory: Path, pause: float | Callable[[], float]) -> HuggingFaceStorageWriter:
    # save_distributed: every process writes its own shards (one file each), and no consolidation
    # or index file, whose completeness the manifest supplies instead.
    writer = HuggingFaceStorageWriter(str(directory), save_distributed=True)
    writer.fs = _SummingFileSystem(pause if callable(pause) else (lambda: pause))
    return writer


def _own_files(directory: Path, writer: HuggingFaceStorageWriter) -> dict[str, dict]:
    """This process's files: size, and CRC32 where the bytes summed are the whole file (else None:
    the seal sums the file, should DCP ever write other than through the stream)."""
    own = {}
    for name, (crc, size) in writer.fs.written.items():
        on_disk = (directory / name).stat().st_size
        own[name] = {"size": on_disk, "crc32": files.crc_text(crc) if on_disk == size else None}
    return own


def _checksums(directory: Path, reports: list[dict[str, dict]]) -> dict[str, str]:
    """Check that the main process sees every process's files whole, write sharded.json; the checksums for the seal."""
    checksums = {}
    for rank, own in enumerate(reports):
        for name, entry in own.items():
            seen = (directory / name).stat().st_size
            if seen != entry["size"]:
                # A shared file system that does not yet show process N's whole file to the main one.
                raise CheckpointError(f"process {rank} wrote {entry['size']} bytes to {directory / name}, the main process sees {seen}")
            if entry["crc32"] is not None:
                checksums[name] = entry["crc32"]
    shards = sorted(name for own in reports for name in own)
    files.write_json(directory / SHARDED, {"format": FORMAT, "world_size": len(reports), "shards": shards})
    return checksums


def _failed(err: BaseException) -> str:
    """What failed where, in a line per process: DCP's exception carries every failed process's."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException):
        return "; ".join(f"process {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in sorted(err.failures.items()))
    return f"process {_rank()}: {type(err).__name__}: {err}"


def _attempt(action: Callable[[], Any]) -> str | None:
    """None, or why the action failed, for every process to learn: a process that raised alone
    would leave the others waiting in the next collective."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        action()
        return None
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        return _failed(err)


def _raise_if_any(errors: list[str | None]) -> None:
    if error := next((e for e in errors if e), None):
        raise CheckpointError(error)


# ---------------------------------------------------------------- reading


def _unlisted_files(directory: Path) -> str | None:
    """Why the directory's safetensors files are not exactly the shards it lists, or None.
    (DCP's reader merges every safetensors file of its directory into the checkpoint.)"""
    listed = set(files.read_json(directory / SHARDED)["shards"])
    present = {path.name for path in directory.glob(f"*{SHARD_SUFFIX}")}
    if present == listed:
        return None
    return (f"{directory} holds safetensors files that {SHARDED} does not list ({sorted(present - listed)}) or lacks "
            f"listed ones ({sorted(listed - present)}); restore the checkpoint's own files")


def _check_fits(directory: Path, metadata, live: dict[str, torch.Tensor]) -> None:
    """Raise unless the checkpoint holds exactly these keys, at these global shapes, whole."""
    saved = metadata.state_dict_metadata
    missing, unexpected = sorted(live.keys() - saved.keys()), sorted(saved.keys() - live.keys())
    if missing or unexpected:
        raise CheckpointError(f"{directory} does not fit the model and optimizer: missing {missing[:5]}, unexpected {unexpected[:5]} "
                              f"({len(missing)} and {len(unexpected)} keys)")
    for key, tensor in live.items():
        entry = saved[key]
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(f"{directory}: {key} has shape {tuple(entry.size)} there, {tuple(tensor.shape)} here")
        covered = sum(math.prod(chunk.sizes) for chunk in entry.chunks)
        if covered != math.prod(entry.size):
            raise CheckpointError(f"{directory}: the shards of {key} hold {covered} of its {math.prod(entry.size)} elements")


def read_full_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model's full weights from a sharded checkpoint's shards (CPU tensors by name), read by
    this process alone (export, predict, restore from `last`).

    Raises:
        CheckpointError: the directory's shards are not the ones it lists.
    """
    directory = Path(directory)
    if reason := _unlisted_files(directory):
        raise CheckpointError(reason)
    saved = HuggingFaceStorageReader(str(directory)).read_metadata().state_dict_metadata
    weights = {key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
               for key, entry in saved.items() if key.startswith(MODEL_PREFIX)}
    dcp.load(weights, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=True)
    return {key[len(MODEL_PREFIX):]: value for key, value in weights.items()}


# ---------------------------------------------------------------- collectives


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _all_gather(value: Any, group) -> list[Any]:
    if group is None:
        return [value]
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values
