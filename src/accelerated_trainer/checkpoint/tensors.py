"""Pickle-free tensor files: nested state split into a JSON skeleton and safetensors, and the
safetensors writer that checksums while it writes.

Tensors go to safetensors, everything else to JSON: loading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from .files import CheckpointError, crc_text, read_json, write_json

PACED_PIECE = 8 << 20  # write_tensors writes (and pauses) piece by piece
# torch dtypes by their safetensors names (the names of safetensors.torch._TYPES).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


def split_tensors(state: Any, prefix: str = "", to_host: bool = True) -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested state (dicts, lists, tuples) by a reference.

    Returns (skeleton, tensors): the skeleton is JSON-serializable, the tensors go to
    safetensors under their path. Anything that is neither raises, so nothing is ever pickled.
    The tensors are contiguous CPU tensors, or with `to_host` false detached but left where
    they are (for the caller to copy to the host later, see host_tensor).
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            # The running number keeps names unique even where two paths spell the same ("a/b").
            name = f"{len(tensors)}:{path}"
            tensors[name] = host_tensor(value) if to_host else value.detach()
            return {"__tensor__": name}
        if isinstance(value, dict):
            if all(isinstance(key, str) for key in value):
                return {key: encode(item, f"{path}/{key}") for key, item in value.items()}
            # Optimizer state is keyed by parameter index; keep the key types exactly.
            return {"__items__": [[key, encode(item, f"{path}/{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}/{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}/{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"cannot store {type(value).__name__} at {path or '/'} without pickle")

    return encode(state, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of split_tensors."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__items__" in skeleton:
            return {key: join_tensors(item, tensors) for key, item in skeleton["__items__"]}
        if "__tuple__" in skeleton:
            return tuple(join_tensors(item, tensors) for item in skeleton["__tuple__"])
        return {key: join_tensors(item, tensors) for key, item in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(item, tensors) for item in skeleton]
    return skeleton


def host_tensor(value: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor with the value's contents; with `copy`, never sharing its memory."""
    value = value.detach()
    if copy:
        # One copy, whatever the source: a device-to-host transfer or a host memcpy.
        return value.to("cpu", memory_format=torch.contiguous_format, copy=True)
    return value.cpu().contiguous()


def save_state(state: Any, directory: Path, name: str) -> dict[str, str]:
    """Write a nested state as `{name}.json` plus `{name}.safetensors`; their checksums by file name."""
    return write_state(*split_tensors(state), directory, name)


def write_state(skeleton: Any, tensors: dict[str, torch.Tensor], directory: Path, name: str,
                pause: float | Callable[[], float] = 0.0) -> dict[str, str]:
    """Write what split_tensors returned as `{name}.json` plus `{name}.safetensors`; their
    checksums by file name. `pause`: as for write_tensors."""
    digest = write_tensors(directory / f"{name}.safetensors", tensors, pause=pause)
    return {f"{name}.safetensors": digest,
            f"{name}.json": write_json(directory / f"{name}.json", skeleton, indent=None)}  # one line: the C encoder


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  pause: float | Callable[[], float] = 0.0) -> str:
    """Write tensors as one safetensors file, straight from their memory when they are contiguous
    on the CPU (else through a host copy per tensor); return its checksum.

    safetensors' save_file writes the same bytes, but the manifest then needs a second pass that
    reads the whole file back to checksum it (0.1 to 0.2 s per 300 MB on the machine of
    bench/bench_checkpoint.py). The format is an 8-byte header length, a JSON header and the raw
    bytes; writing it here lets the checksum run on another core while the bytes go to the file.
    safetensors reads it (load_file, load_model), which tests/test_storage.py checks for every dtype.

    The file goes in pieces of PACED_PIECE bytes. `pause` (a function is asked before each
    piece): with 0, a piece is written flat out and summed on another core meanwhile; else one
    thread writes and sums it, then sleeps `pause` times as long as that took. A background save
    then leaves the memory bandwidth and the cores to training most of the time
    (bench/bench_async_save.py).
    """
    pace = pause if callable(pause) else (lambda: pause)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data starts 8-byte aligned

    def chunks():
        yield memoryview(struct.pack("<Q", len(text)) + text)
        for tensor in tensors.values():  # one at a time: a device tensor's host copy lives only while written
            yield memoryview(host_tensor(tensor).reshape(-1).view(torch.uint8).numpy())

    crc = 0
    small = offset < PACED_PIECE  # one piece: summed inline, a thread beside it would cost more than it saves
    # No O_TRUNC: a recycled file (temporary_dir) is overwritten in place, then cut to length.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    summing = nullcontext() if small else ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32")
    with open(descriptor, "wb") as handle, summing as summer:
        for chunk in chunks():
            for start in range(0, max(len(chunk), 1), PACED_PIECE):
                piece, began = chunk[start:start + PACED_PIECE], time.perf_counter()
                factor = 0.0 if small else pace()
                if small or factor:
                    handle.write(piece)
                    crc = zlib.crc32(piece, crc)
                    if factor:
                        time.sleep(factor * (time.perf_counter() - began))
                    continue
                # Both the write and zlib.crc32 release the GIL: the piece is summed while it is written.
                summed = summer.submit(zlib.crc32, piece, crc)
                handle.write(piece)
                crc = summed.result()
        handle.truncate()
    return crc_text(crc)


def load_state(directory: Path, name: str) -> Any:
    tensors = load_file(str(directory / f"{name}.safetensors"), device="cpu")
    return join_tensors(read_json(directory / f"{name}.json"), tensors)
