"""Shared by the bench scripts: summaries of repeated timings, markdown tables, silenced output.

Every bench alternates its variants in rounds (the order rotates each round) so that a slow
phase of the machine hits every variant alike, and reports the median with the min-max range.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rounds(variants: Sequence[str], n_rounds: int) -> Iterator[tuple[int, str]]:
    """(round, variant) pairs; each round starts one variant later so none always runs first."""
    for r in range(n_rounds):
        for i in range(len(variants)):
            yield r, variants[(i + r) % len(variants)]


def summary(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table (pastes into the README as is)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def silenced(log: Path | None = None) -> Iterator[None]:
    """Send file descriptors 1 and 2 to `log` (or /dev/null) inside the block.

    Progress bars and framework banners still do all their formatting work, as in a user's
    terminal, but do not bury the tables. On an error the captured output is printed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile("w+") if log is None else open(log, "a+") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            sink.seek(0)
            sys.stderr.write(sink.read()[-4000:])
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def environment() -> str:
    """One line naming the versions and the package source measured, for the record.

    To measure a fixed commit while the working tree changes, export it and put it first:
    `git archive HEAD | tar -x -C /tmp/at && PYTHONPATH=/tmp/at/src python bench/...`.
    """
    import importlib.util
    import platform

    import torch

    spec = importlib.util.find_spec("accelerated_trainer")
    source = Path(spec.origin).parent.parent if spec and spec.origin else None
    where = "accelerated_trainer not importable"
    if source is not None:
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=False).stdout.strip()
        if commit and Path(top).resolve() == source.parent.resolve():
            dirty = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True, check=False).stdout.strip()
            where = f"package from {source} at commit {commit}{' + uncommitted changes' if dirty else ''}"
        else:
            where = f"package from {source}"
    return f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, {where}"
