"""`python -m accelerated_trainer.launch ARGS`: `accelerate launch ARGS`, with a stop told in one line.

For cluster scripts (launch/slurm_multinode.sbatch). When the launcher (torchrun's agent, inside
`accelerate launch`) is signalled, it passes the signal on to its workers and waits for them,
then ends on an uncaught SignalException: some 30 lines of traceback per node in the job log,
for an expected event. When its workers exit with one of train.py's own exit codes (99:
preempted, `last` saved; 2: invalid config or data, ...), having said why, it adds a
ChildFailedError report and exits with 1. Here the first ends with one line and 128 + the
signal's number, the second with one line and the workers' code. Anything else (a worker's
traceback, a worker killed, codes that differ) is accelerate's own outcome.
"""

from __future__ import annotations

import signal
import sys

from .cli import (
    INTERRUPTED_EXIT_CODE,
    INVALID_INPUT_EXIT_CODE,
    LOST_PROCESS_EXIT_CODE,
    NOT_SAVED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    STOPPED_BY_FAULT_EXIT_CODE,
)

# train.py's exit codes after which every worker has printed what happened.
TOLD = {
    INVALID_INPUT_EXIT_CODE: "invalid config or data",
    LOST_PROCESS_EXIT_CODE: "another process died or hung",
    STOPPED_BY_FAULT_EXIT_CODE: "a checkpoint write failed or the loss became NaN/inf",
    NOT_SAVED_EXIT_CODE: "training ended but its final state could not be saved",
    PREEMPTED_EXIT_CODE: "preempted, `last` saved",
    INTERRUPTED_EXIT_CODE: "interrupted by Ctrl-C",
}


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except SignalException as err:
        print(f"launcher: got {signal.Signals(err.sigval).name}, passed it on to the workers and waited for them",
              file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        code = codes.pop() if len(codes) == 1 else None
        if code not in TOLD:
            raise
        print(f"launcher: the workers exited with code {code} ({TOLD[code]})", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
