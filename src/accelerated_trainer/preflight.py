"""Preflight: before a run of several processes trains, check that they can work together.

A cluster job that is set up wrong fails late and vaguely: a node that never joins leaves the
others waiting for the collective timeout (10 minutes by default) with no word of which node is
missing, and a run directory on a node-local disk shows only when a resume finds no checkpoint.
So before the trainer is built, every process

1. forms the process group and completes one all-reduce within `timeout_s`; a process that
   cannot says which node it is on and what it was waiting for, and leaves;
2. checks the run directory: rank 0 writes a token file where the run directory will be, and
   the first process of every other node must resolve the same path, find the token there
   and write a file of its own. The findings are gathered, and every process raises one error
   that names each node at fault.

Runs only when the launcher started several processes (WORLD_SIZE > 1).
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

from .config import ConfigError

TOKEN_PREFIX = ".preflight-"
# A file another node has just closed is visible here at once on NFS (close-to-open), Lustre
# and GPFS; the wait only spares a slow metadata server a false alarm.
SHARED_FILE_WAIT_S = 2.0


def node_name() -> str:
    """The node this process runs on, as the scheduler calls it."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


class _Deadline:
    """Leaves the process with a message if the checks are still running after `timeout_s`.

    A collective that waits for a process which never comes waits in C++, where Python cannot
    interrupt it; a watchdog thread reports it and ends the process with os._exit.
    """

    def __init__(self, timeout_s: float, exit_code: int, where: str):
        self.timeout_s, self.exit_code, self.where = timeout_s, exit_code, where
        self.stage = "forming the process group"
        self._done = threading.Event()

    def __enter__(self) -> _Deadline:
        threading.Thread(target=self._watch, name="preflight-deadline", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _watch(self) -> None:
        if self._done.wait(self.timeout_s):
            return
        print(f"error: preflight: {self.where} was still {self.stage} after {self.timeout_s:g} s. A process on another "
              "node did not start, or cannot reach this one: check that node's log, that every node reaches the "
              "rendezvous address and port, and the network between the nodes (NCCL: NCCL_SOCKET_IFNAME, "
              "NCCL_DEBUG=INFO). experiment_options.preflight_timeout_s sets this limit.", file=sys.stderr, flush=True)
        os._exit(self.exit_code)


def check(run_dir: Path, timeout_s: float, distributed_timeout_s: float, exit_code: int) -> None:
    """Form the process group and check it and the run directory; a no-op for one process.

    The process group is created here, as the trainer's Accelerator would (it then uses this
    one), with `distributed_timeout_s` as its collective timeout. A process that cannot form
    the group, finish the all-reduce or the directory check within `timeout_s` prints which
    node it is on and what it waited for, and exits with `exit_code`.

    Raises:
        ConfigError: a node resolves the run directory to another path, does not see rank 0's
            file in it (not a shared file system) or cannot write there; the message names it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    where = f"node {node_name()} (rank {os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']})"
    with _Deadline(timeout_s, exit_code, where) as deadline:
        # The same device choice as the trainer's Accelerator: ACCELERATE_USE_CPU=1 means gloo.
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                             timeout=timedelta(seconds=distributed_timeout_s))
        if state.num_processes <= 1:
            return  # the launcher and accelerate disagree: the trainer reports it with the right command
        deadline.stage = "waiting in its first all-reduce"
        _all_reduce(state)
        deadline.stage = "checking the run directory with the other nodes"
        problems = _check_run_dir(state, Path(run_dir))
    if problems:
        raise ConfigError("preflight: the run directory must be one directory that every node shares and can write: "
                          + " ".join(problems) + " Put experiment_options.ckpt_dir on a file system all nodes mount "
                          "(not a node-local disk or /tmp), as an absolute path.")


def _all_reduce(state) -> None:
    import torch
    import torch.distributed as dist

    ones = torch.ones(1, device=state.device)
    dist.all_reduce(ones)
    if ones.is_cuda:
        torch.cuda.synchronize(ones.device)  # waits without the GIL, so that the deadline's thread can report
    if int(ones.item()) != state.num_processes:
        raise RuntimeError(f"preflight: an all-reduce of ones over {state.num_processes} processes gave {ones.item()}")


def _check_run_dir(state, run_dir: Path) -> list[str]:
    """Every node's finding about the run directory (empty: all is well)."""
    import torch.distributed as dist

    here, node = str(run_dir.absolute()), node_name()
    token, problem = None, None
    if state.is_main_process:
        token, problem = _write_token(Path(here), node)
    shared = [token, here, node]
    dist.broadcast_object_list(shared, src=0)
    token, main_dir, main_node = shared
    if state.is_local_main_process and not state.is_main_process:
        if here != main_dir:
            problem = (f"node {node} resolves the run directory to {here}, rank 0 on node {main_node} to {main_dir} "
                       "(a relative ckpt_dir read from another working directory?).")
        elif token is not None:
            problem = _find_token(Path(here), token, node, main_node)
    problems = [None] * state.num_processes
    dist.all_gather_object(problems, problem)
    if token is not None and state.is_main_process:
        _token_path(Path(here), token).unlink(missing_ok=True)
    return [found for found in problems if found]


def _token_dir(run_dir: Path) -> Path:
    # The run directory itself once it exists; before the first run, its parent (ckpt_dir),
    # which the trainer would create anyway: a refused start leaves no empty run directory.
    return run_dir if run_dir.is_dir() else run_dir.parent


def _token_path(run_dir: Path, token: str, suffix: str = "") -> Path:
    return _token_dir(run_dir) / f"{TOKEN_PREFIX}{token}{suffix}"


def _write_token(run_dir: Path, node: str) -> tuple[str | None, str | None]:
    token = secrets.token_hex(8)
    try:
        _token_dir(run_dir).mkdir(parents=True, exist_ok=True)
        _token_path(run_dir, token).write_text(node)
    except OSError as err:
        return None, f"node {node} (rank 0) cannot write into {_token_dir(run_dir)}: {err}."
    return token, None


def _find_token(run_dir: Path, token: str, node: str, main_node: str) -> str | None:
    path = _token_path(run_dir, token)
    deadline = time.monotonic() + SHARED_FILE_WAIT_S
    while not path.is_file():
        if time.monotonic() >= deadline:
            return (f"node {node} does not see the file {path.name} that node {main_node} wrote into "
                    f"{_token_dir(run_dir)}: that directory is not shared between them.")
        time.sleep(0.05)
    mine = _token_path(run_dir, token, f"-{node}")
    try:
        mine.write_text(node)
        mine.unlink()
    except OSError as err:
        return f"node {node} cannot write into {_token_dir(run_dir)}: {err}."
    return None
