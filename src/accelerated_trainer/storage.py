"""Pickle-free state files and crash-consistent checkpoint directories.

Tensors go to safetensors, everything else to JSON: loading a checkpoint never runs code.
A checkpoint directory is written under a temporary name, fsynced, given a manifest of every
file's size and sha256, and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read back as a whole."""


# ---------------------------------------------------------------- pickle-free nested state


def split_tensors(state: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested state (dicts, lists, tuples) by a reference.

    Returns (skeleton, tensors): the skeleton is JSON-serializable, the tensors go to
    safetensors under their path. Anything that is neither raises, so nothing is ever pickled.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            # The running number keeps names unique even where two paths spell the same ("a/b").
            name = f"{len(tensors)}:{path}"
            tensors[name] = value.detach().cpu().contiguous()
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


def save_state(state: Any, directory: Path, name: str) -> None:
    """Write a nested state as `{name}.json` plus `{name}.safetensors`."""
    skeleton, tensors = split_tensors(state)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    write_json(directory / f"{name}.json", skeleton)


def load_state(directory: Path, name: str) -> Any:
    tensors = load_file(str(directory / f"{name}.safetensors"), device="cpu")
    return join_tensors(read_json(directory / f"{name}.json"), tensors)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- crash-consistent directories


def temporary_dir(dest: Path) -> Path:
    """A fresh, empty sibling of `dest` to write into; any leftover from a crashed save is removed."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def seal(directory: Path) -> None:
    """Record every file's size and sha256 in the manifest, and fsync files, manifest and directory."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST):
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        _fsync(path)
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
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupted)"
    return None


def publish(tmp: Path, dest: Path, keep_previous: Path | None = None) -> None:
    """Rename a sealed `tmp` to `dest`. The old `dest` goes to `keep_previous` (replacing the one
    there) or is deleted, but only once the new directory is in place."""
    trash = dest.with_name(f".{dest.name}.trash")
    for leftover in (trash, trash.with_name(trash.name + "-previous")):  # from a crash mid-cleanup
        if leftover.exists():
            shutil.rmtree(leftover)
    if dest.exists():
        if keep_previous is not None:
            if keep_previous.exists():
                keep_previous.rename(trash.with_name(trash.name + "-previous"))
            dest.rename(keep_previous)
        else:
            dest.rename(trash)
    tmp.rename(dest)
    _fsync(dest.parent)
    for leftover in (trash, trash.with_name(trash.name + "-previous")):
        if leftover.exists():
            shutil.rmtree(leftover)


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
