"""Asynchronous `last` saves: a host snapshot of the live state, written on a background thread.

The training thread hands the live weights and optimizer tensors to a `PendingSave`. Its thread
first copies them into `Staging` buffers (host memory kept from save to save, pinned for CUDA
tensors), which takes a memcpy (a device-to-host copy on a GPU) while the next forward and
backward run; only then may the optimizer step change them. The files are written from the
snapshot afterwards while training goes on, paced: after each piece the thread sleeps
WRITE_PAUSE times as long as the piece took, so that the save leaves the memory bandwidth and
the cores to training three quarters of the time. It paces itself for at most half the time
between the two saves before it, then goes flat out, as it does as soon as anyone waits for it
(the next save, an evaluation, the end of the run, a failure): pacing never delays them.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

# Pause per second of writing of a background save. On the 2 cores of bench/bench_async_save.py,
# steps during a save ran 1.12x with no pause, 1.08x with 1, 1.03x with 3 (medians against the
# steps outside a save); the save then takes about 4x its flat-out time unless someone waits.
WRITE_PAUSE = 3.0


class Staging:
    """Host buffers for the snapshot of an asynchronous save, reused while shapes and dtypes hold.

    The first save allocates them: one copy of the saved state in host memory for the rest of
    the run (as torch.distributed.checkpoint's async_save holds). Reuse spares every later save
    the cost of faulting in fresh memory.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, tensors: dict[str, torch.Tensor], group: str) -> dict[str, torch.Tensor]:
        """Copies of `tensors` (same names) in this group's buffers; the previous contents are gone."""
        copies = {}
        for name, tensor in tensors.items():
            key = f"{group}/{name}"
            buffer = self._buffers.get(key)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
                self._buffers[key] = buffer
            copies[name] = buffer.copy_(tensor.detach())
        return copies

    def release(self) -> None:
        self._buffers.clear()


_writer: ThreadPoolExecutor | None = None


def writer() -> ThreadPoolExecutor:
    """The one thread asynchronous saves are written on, started by the first: a thread started
    per save would cost the training thread that much at every save. Its thread is joined at
    interpreter exit, so a save in flight is finished first."""
    global _writer
    if _writer is None:
        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-save")
    return _writer


class PendingSave:
    """A `last` save writing on the save thread (main process), or nothing to wait for (others).

    `attempt(captured, pause)` does the save and returns its error message (None on success); it
    calls `captured()` once the optimizer step may change the live tensors, and `pause()` for
    the pause factor of its writes (tensors.write_tensors): WRITE_PAUSE for the first
    `pace_for` seconds, then 0, and 0 as soon as someone waits for the result or hurries it.
    """

    def __init__(self, previous_last: Any, attempt: Callable[[Callable[[], None], Callable[[], float]], str | None] | None,
                 dest: Path, cleanup: Path | None, intact: str, pace_for: float = 0.0):
        self.previous_last, self.dest, self.cleanup, self.intact = previous_last, dest, cleanup, intact
        self.captured = threading.Event()  # set once the optimizer step may change the saved tensors
        self.crash: BaseException | None = None  # an error other than a failed write (a bug, out of memory)
        self._error: str | None = None
        self._waited_for = threading.Event()  # the rest is written flat out
        self.began = time.perf_counter()
        self._ended: float | None = None
        self._pace_until = self.began + pace_for
        self._future = None
        if attempt is None:
            self._ended = self.began
            self.captured.set()
        else:
            self._future = writer().submit(self._run, attempt)

    def pause(self) -> float:
        if self._waited_for.is_set() or time.perf_counter() > self._pace_until:
            return 0.0
        return WRITE_PAUSE

    def _run(self, attempt: Callable[[Callable[[], None], Callable[[], float]], str | None]) -> None:
        try:
            self._error = attempt(self.captured.set, self.pause)
        except BaseException as err:  # reported like a failed write, with this as its cause
            self.crash = err
            if self.cleanup is not None:  # the main process's temporary directory
                shutil.rmtree(self.cleanup, ignore_errors=True)
            self._error = f"writing the checkpoint {self.dest} failed: {type(err).__name__}: {err}. {self.intact}"
        finally:
            self._ended = time.perf_counter()
            self.captured.set()  # a failed write must not hold training

    def done(self) -> bool:
        """Whether the write has ended (without waiting for it)."""
        return self._future is None or self._future.done()

    def took_at_most(self, share: float) -> bool:
        """Whether the write has ended and took at most `share` of the time since it began."""
        ended = self._ended  # set when the write returns (on the save thread)
        return ended is not None and ended - self.began <= share * (time.perf_counter() - self.began)

    def hurry(self) -> None:
        """Write the rest flat out: someone needs the save done (a newer one is due)."""
        self._waited_for.set()

    def result(self) -> str | None:
        """Wait for the write; its error message (None when it succeeded)."""
        if self._future is not None:
            self.hurry()
            self._future.result()
        return self._error
