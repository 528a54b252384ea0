"""Pickle-free state files and crash-consistent checkpoint directories.

Tensors go to safetensors, everything else to JSON: loading a checkpoint never runs code.
A checkpoint directory is written under a temporary name, fsynced, given a manifest of every
file's size and CRC32, and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

MANIFEST = "manifest.json"
PACED_PIECE = 8 << 20  # write_tensors writes (and pauses) piece by piece
# torch dtypes by their safetensors names (the names of safetensors.torch._TYPES).
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back as a whole."""


# ---------------------------------------------------------------- pickle-free nested state


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
    """Write a nested state as `{name}.json` plus `{name}.safetensors`; the checksum of the latter by file name."""
    return write_state(*split_tensors(state), directory, name)


def write_state(skeleton: Any, tensors: dict[str, torch.Tensor], directory: Path, name: str,
                pause: float | Callable[[], float] = 0.0) -> dict[str, str]:
    """Write what split_tensors returned as `{name}.json` plus `{name}.safetensors`; the checksum of
    the latter by file name. `pause`: as for write_tensors."""
    digest = write_tensors(directory / f"{name}.safetensors", tensors, pause=pause)
    write_json(directory / f"{name}.json", skeleton)
    return {f"{name}.safetensors": digest}


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
    # No O_TRUNC: a recycled file (temporary_dir) is overwritten in place, then cut to length.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    with open(descriptor, "wb") as handle, ThreadPoolExecutor(max_workers=1, thread_name_prefix="crc32") as pool:
        for chunk in chunks():
            for start in range(0, max(len(chunk), 1), PACED_PIECE):
                piece, began = chunk[start:start + PACED_PIECE], time.perf_counter()
                if factor := pace():
                    handle.write(piece)
                    crc = zlib.crc32(piece, crc)
                    time.sleep(factor * (time.perf_counter() - began))
                    continue
                # Both the write and zlib.crc32 release the GIL: the piece is summed while it is written.
                summed = pool.submit(zlib.crc32, piece, crc)
                handle.write(piece)
                crc = summed.result()
        handle.truncate()
    return _crc_text(crc)


def load_state(directory: Path, name: str) -> Any:
    tensors = load_file(str(directory / f"{name}.safetensors"), device="cpu")
    return join_tensors(read_json(directory / f"{name}.json"), tensors)


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text; `indent=None` is one line, from the json module's C encoder (indented text takes
    its Python one: some ms for an RNG state of thousands of numbers)."""
    return json.dumps(data, indent=indent, sort_keys=False) + "\n"


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    path.write_text(to_json(data, indent))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- crash-consistent directories


def temporary_dir(dest: Path, recycle: Path | None = None, keep: tuple[str, ...] = ()) -> Path:
    """A sibling of `dest` to write into; any leftover from a crashed save is removed.

    With `recycle`, an older checkpoint directory becomes it: unsealed first (so it never again
    passes for a checkpoint), emptied but for the files named in `keep`, renamed. Those files
    are then overwritten in place (write_tensors): no blocks are freed and allocated again, and
    their pages are often still cached, which on the machine of bench/bench_async_save.py makes
    the write several times faster than into new files. Else the directory is new and empty.
    """
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if recycle is not None and (recycle / MANIFEST).is_file():
        (recycle / MANIFEST).unlink()
        _fsync(recycle)
        for path in recycle.iterdir():
            if path.name not in keep or not path.is_file():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        recycle.rename(tmp)
    else:
        tmp.mkdir(parents=True)
    return tmp


def seal(directory: Path, checksums: dict[str, str] | None = None) -> None:
    """Record every file's size and CRC32 in the manifest, and fsync files, manifest and directory.

    `checksums`: those of files summed while written (write_tensors), by file name.
    """
    checksums = checksums or {}
    paths = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    # The disk flushes while the CPU sums what is left: both release the GIL.
    with ThreadPoolExecutor(max_workers=max(len(paths), 1), thread_name_prefix="fsync") as pool:
        flushed = [pool.submit(_fsync, path) for path in paths]
        files = {path.name: {"size": path.stat().st_size, "crc32": checksums.get(path.name) or _crc32(path)} for path in paths}
        for future in flushed:
            future.result()
    write_json(directory / MANIFEST, {"files": files})
    _fsync(directory / MANIFEST)
    _fsync(directory)


def verify(directory: Path) -> str | None:
    """None when every file of the manifest is present, whole and unchanged; else why not."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{directory} has no {MANIFEST} (an unfinished save)"
    try:
        files = read_json(manifest)["files"]
    except (ValueError, KeyError) as err:
        return f"{manifest} is unreadable: {err}"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
        # Checkpoints before CRC32 manifests recorded sha256.
        kind = "crc32" if "crc32" in expected else "sha256"
        if (_crc32 if kind == "crc32" else _sha256)(path) != expected[kind]:
            return f"{path} does not match its {kind} in the manifest (corrupted)"
    return None


def publish(tmp: Path, dest: Path, keep_previous: Path | None = None) -> None:
    """Rename a sealed `tmp` to `dest`. The old `dest` goes to `keep_previous` (replacing the one
    there) or is deleted, but only once the new directory is in place."""
    trash = dest.with_name(f".{dest.name}.trash")
    retired = [trash, trash.with_name(trash.name + "-previous")]
    _discard(retired)  # leftovers from a crash mid-cleanup
    if dest.exists():
        if keep_previous is not None:
            if keep_previous.exists():
                keep_previous.rename(retired[1])
            dest.rename(keep_previous)
        else:
            dest.rename(trash)
    tmp.rename(dest)
    _fsync(dest.parent)
    _discard(retired)


def _discard(directories: list[Path]) -> None:
    """Delete directories that publish set aside (no longer checkpoints: they are renamed out of the way)."""
    for directory in directories:
        if directory.exists():
            shutil.rmtree(directory)


def remove(directory: Path) -> None:
    """Delete a checkpoint directory: unseal it first so a crash mid-delete leaves no half checkpoint that verifies."""
    if directory.exists():
        (directory / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(directory)


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, data)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _crc32(path: Path) -> str:
    # CRC32 rather than a cryptographic hash: it is there to catch truncation and corruption, not
    # tampering, and zlib sums about twice as fast as sha256 here, faster than the disk writes,
    # so summing while writing costs no time (bench/bench_checkpoint.py).
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return _crc_text(crc)


def _crc_text(crc: int) -> str:
    return f"{crc:08x}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
