"""train.py's command line in a process that SIGKILLs itself at a chosen moment (crash tests).

CRASH_AT selects the moment, N counting from 1:
  step:N     right after optimizer step N, before anything of that step is saved
  seal:N     in the N-th save of `last`: every file written, the manifest not yet
  publish:N  in the N-th publish of `last` (files.shift_in): the old `last` already moved to
             `previous`, the new one not yet renamed into place
CRASH_RANK is the process that dies (default 0); under a launcher the others are then ended by it.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from accelerated_trainer import cli  # noqa: E402
from accelerated_trainer.checkpoint import files  # noqa: E402
from accelerated_trainer.trainer import AcceleratedTrainer  # noqa: E402

point, _, nth = os.environ["CRASH_AT"].partition(":")
nth = int(nth)
calls = {"count": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def is_nth_last_save(directory: Path) -> bool:
    if directory.name not in (".last.tmp", "last"):
        return False
    calls["count"] += 1
    return calls["count"] == nth


if int(os.environ.get("RANK", "0")) == int(os.environ.get("CRASH_RANK", "0")):
    if point == "step":
        after_step = AcceleratedTrainer._after_optimizer_step

        def _after_optimizer_step(self):
            if self.state.step + 1 == nth:
                die()
            return after_step(self)

        AcceleratedTrainer._after_optimizer_step = _after_optimizer_step
    elif point == "seal":
        seal = files.seal

        def _seal(directory, checksums=None):
            if is_nth_last_save(directory):
                die()
            return seal(directory, checksums)

        files.seal = _seal
    elif point == "publish":
        shift_in = files.shift_in

        def _shift_in(tmp, slots, current):
            if is_nth_last_save(slots[0]) and current:
                # Every rename but the last: the slots have moved down, the new `last` is not in place.
                kept = [tmp, *current][:len(slots)]
                for source, slot in reversed(list(zip(kept, slots))[1:]):
                    if source != slot:
                        source.rename(slot)
                die()
            return shift_in(tmp, slots, current)

        files.shift_in = _shift_in
    else:
        raise SystemExit(f"unknown CRASH_AT {point!r}")

cli.run_and_exit(sys.argv[1:])
