"""The preempted marker: `{run_dir}/preempted.json`, written when a launch stopped preempted.

A cluster script cannot tell a preemption from a failure by the exit status alone: `accelerate
launch` reports a worker's 99 as 1, and a launcher that was signalled itself ends with its own
status. So the main process of a run that stopped preempted (a signal or max_time_s, with a
complete `last`) writes this file, and the script requeues the job only when it finds one.

The marker names the job attempt that wrote it (SLURM_JOB_ID and SLURM_RESTART_COUNT), and every
run removes an earlier marker when it starts, so a marker of an earlier preemption never makes a
later failure look like one.

    python -m accelerated_trainer.preempted_marker RUN_DIR    exit 0: this job attempt stopped preempted

Imports nothing heavy: the cluster script runs the check above.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FILENAME = "preempted.json"


def this_attempt(environ=os.environ) -> dict[str, str | None]:
    """What identifies this launch under Slurm (None outside a Slurm job)."""
    job = environ.get("SLURM_JOB_ID")
    return {"slurm_job_id": job, "slurm_restart_count": environ.get("SLURM_RESTART_COUNT", "0") if job else None}


def clear(run_dir: Path) -> None:
    """Remove a marker left by an earlier launch. Call on the main process before training."""
    (Path(run_dir) / FILENAME).unlink(missing_ok=True)


def write(run_dir: Path, step: int, reason: str, environ=os.environ) -> None:
    """Record that this launch stopped preempted at `step`, with `last` complete.

    Written atomically (a temporary file renamed over), so a reader sees a whole marker or none.
    """
    path = Path(run_dir) / FILENAME
    temporary = path.with_name(f".{FILENAME}.tmp")
    temporary.write_text(json.dumps({**this_attempt(environ), "step": step, "reason": reason}) + "\n")
    os.replace(temporary, path)


def read(run_dir: Path) -> dict | None:
    """The marker's content, or None when there is none (or it is not readable JSON)."""
    try:
        return json.loads((Path(run_dir) / FILENAME).read_text())
    except (OSError, ValueError):
        return None


def written_by_this_attempt(run_dir: Path, environ=os.environ) -> bool:
    """Whether the run directory holds a marker that this job attempt wrote."""
    marker = read(run_dir)
    attempt = this_attempt(environ)
    return marker is not None and all(marker.get(key) == value for key, value in attempt.items())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m accelerated_trainer.preempted_marker RUN_DIR", file=sys.stderr)
        return 2
    return 0 if written_by_this_attempt(Path(args[0])) else 1


if __name__ == "__main__":
    sys.exit(main())
