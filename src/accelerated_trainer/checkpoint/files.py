"""Crash-consistent checkpoint directories: written under a temporary name, fsynced, sealed with a
manifest of every file's size and CRC32, and only then renamed into place; JSON files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
PARALLEL_FSYNC_BYTES = 64 << 20  # seal flushes a checkpoint's files in parallel from this size on


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back as a whole."""


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON text; `indent=None` is one line, from the json module's C encoder (indented text takes
    its Python one: some ms for an RNG state of thousands of numbers). JSON has no NaN or
    infinity: they are written as the strings "nan", "inf" and "-inf"."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite(data), indent=indent, allow_nan=False) + "\n"


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def write_json(path: Path, data: Any, indent: int | None = 2, fsync: bool = False) -> str:
    """Write `data` as JSON (see write_text_file); return the file's CRC32."""
    return write_text_file(path, to_json(data, indent), fsync=fsync)


def write_text_file(path: Path, text: str, fsync: bool = False) -> str:
    """Write `text` (UTF-8) as the file at `path` and return its CRC32, summed from memory.

    Through the file descriptor: open, write, (fsync,) close. A Python file object adds a stat,
    an ioctl and two seeks, and summing the file afterwards would read it back. Each system call
    a background save makes costs the training thread a GIL hand-over (bench/bench_save_thread.py).
    """
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return crc_text(zlib.crc32(data))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


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
        with os.scandir(recycle) as entries:  # the entries know their type: no stat per file
            for entry in list(entries):
                if entry.name not in keep or not entry.is_file():
                    shutil.rmtree(entry.path) if entry.is_dir() else os.unlink(entry.path)
        recycle.rename(tmp)
    else:
        tmp.mkdir(parents=True)
    return tmp


def seal(directory: Path, checksums: dict[str, str] | None = None) -> None:
    """Record every file's size and CRC32 in the manifest, and fsync files, manifest and directory.

    `checksums`: those of files summed while written (write_tensors), by file name.
    """
    checksums = checksums or {}
    with os.scandir(directory) as entries:  # the entries know their type: one stat per file, for its size
        found = sorted((entry for entry in entries if entry.is_file() and entry.name != MANIFEST), key=lambda entry: entry.name)
    paths = [Path(entry.path) for entry in found]
    sizes = {entry.name: entry.stat().st_size for entry in found}

    def listing() -> dict:
        return {path.name: {"size": sizes[path.name], "crc32": checksums.get(path.name) or _crc32(path)} for path in paths}

    if sum(sizes.values()) < PARALLEL_FSYNC_BYTES:  # a few small files: threads would cost more than they save
        for path in paths:
            _fsync(path)
        files = listing()
    else:
        # The disk flushes while the CPU sums what is left: both release the GIL.
        with ThreadPoolExecutor(max_workers=max(len(paths), 1), thread_name_prefix="fsync") as pool:
            flushed = [pool.submit(_fsync, path) for path in paths]
            files = listing()
            for future in flushed:
                future.result()
    write_json(directory / MANIFEST, {"files": files}, indent=None, fsync=True)
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
    # A tensor file the manifest does not list would be read as part of a sharded checkpoint
    # (DCP's reader takes every safetensors file of its directory).
    if unlisted := sorted(path.name for path in directory.glob("*.safetensors") if path.name not in files):
        return f"{directory / unlisted[0]} is not in {MANIFEST} (a file added after the checkpoint was sealed)"
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


def publish(tmp: Path, dest: Path) -> None:
    """Rename a sealed `tmp` to `dest`; the old `dest` is deleted once the new one is in place."""
    trash = dest.with_name(f".{dest.name}.trash")
    remove(trash)  # a leftover from a crash mid-cleanup
    if dest.exists():
        dest.rename(trash)
    tmp.rename(dest)
    _fsync(dest.parent)
    remove(trash)


def shift_in(tmp: Path, slots: list[Path], current: list[Path]) -> list[Path]:
    """Publish a sealed `tmp` as slots[0], the checkpoints `current` (newest first) moving down to
    slots[1:]; return the checkpoints now in the slots, newest first.

    Every rename moves a complete checkpoint to a free name, the oldest first, so a crash between
    two renames leaves each of them whole under some name (a resume takes the newest by step).
    What held a slot without being one of `current` (a damaged checkpoint) and what no longer
    fits are set aside first and deleted only once the new checkpoint is in place.
    """
    kept = [tmp, *current][:len(slots)]
    aside = [slot for slot in slots if slot.exists() and slot not in kept]
    trash = [directory.with_name(f".{directory.name}.trash") for directory in aside]
    for directory, bin_ in zip(aside, trash):
        remove(bin_)
        directory.rename(bin_)
    for source, slot in reversed(list(zip(kept, slots))):
        if source != slot:
            source.rename(slot)
    _fsync(slots[0].parent)
    for directory in trash:
        remove(directory)
    return slots[:len(kept)]


def remove(directory: Path) -> None:
    """Delete a checkpoint directory: unseal it first so a crash mid-delete leaves no half checkpoint that verifies."""
    if directory.exists():
        (directory / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(directory)


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, data, fsync=True)
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
    return crc_text(crc)


def crc_text(crc: int) -> str:
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
