"""`python -m accelerated_trainer.launch ARGS`: `accelerate launch ARGS`, with a stop told in one line.

For cluster scripts (launch/slurm_multinode.sbatch). When the launcher (torchrun's agent, inside
`accelerate launch`) is signalled, it passes the signal on to its workers and waits for them,
then ends on an uncaught SignalException: some 30 lines of traceback per node in the job log,
for an expected event. When its workers all exit with 99 (preempted, `last` saved), it ends on a
ChildFailedError report and exit code 1. Here the first ends with one line and 128 + the
signal's number, the second with one line and 99. Anything else is accelerate's own outcome.
"""

from __future__ import annotations

import signal
import sys

from .cli import PREEMPTED_EXIT_CODE


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
        if {failure.exitcode for failure in err.failures.values()} != {PREEMPTED_EXIT_CODE}:
            raise
        print(f"launcher: the workers stopped preempted (exit code {PREEMPTED_EXIT_CODE}, `last` saved)",
              file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
