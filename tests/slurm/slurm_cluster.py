"""A real Slurm cluster on localhost for the tests (kit/: Debian's slurm-wlm, started as root).

Adapted from kit/README.md's pytest example: SlurmCluster starts the kit's 2-node cluster
(`n1`, `n2`, 2 CPUs each) on free ports and reads jobs through `scontrol show job`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

KIT = Path(__file__).resolve().parent / "kit"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def free_port_range(count: int, first: int = 6817, step: int = 10) -> int:
    """The first port of `count` consecutive ports on 127.0.0.1 that nothing listens on."""
    for base in range(first, first + 100 * step, step):
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} free consecutive ports from {first}")


class SlurmCluster:
    """A running cluster; `env` is what Slurm's commands need (SLURM_CONF)."""

    def __init__(self, nodes: int, directory: Path, cpus: int = 2):
        self.directory = directory
        env = {**os.environ, "LOCAL_SLURM_DIR": str(directory), "LOCAL_SLURM_CPUS": str(cpus),
               "LOCAL_SLURM_PORT": str(free_port_range(nodes + 1))}
        # 900 s: on a new machine this installs slurm-wlm and munge with apt first.
        done = subprocess.run([str(KIT / "start-cluster.sh"), str(nodes)], env=env, capture_output=True, text=True,
                              timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"start-cluster.sh {nodes} failed:\n{done.stderr}")
        self.env = {**env, **dict(re.findall(r"^export (\w+)=(.*)$", done.stdout, re.M))}

    def stop(self) -> None:
        subprocess.run([str(KIT / "stop-cluster.sh"), str(self.directory)], env=self.env, capture_output=True, text=True,
                       timeout=120)

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True, timeout=60).stdout

    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> int:
        done = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict: JobState, Restarts, Reason, ExitCode, StartTime, ..."""
        return dict(re.findall(r"(\w+)=(\S*)", self.run("scontrol", "show", "job", "-o", str(job_id))))

    def wait_for(self, job_id: int, predicate, what: str, timeout: float = 300) -> dict:
        """The job once predicate(job) holds; fails if it reaches a final state or the timeout first."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if predicate(job):
                return job
            if job["JobState"] in FINAL or time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: waited for {what}, found {job['JobState']} "
                                     f"(Reason={job.get('Reason')}, Restarts={job.get('Restarts')})")
            time.sleep(0.5)

    def wait_final(self, job_id: int, timeout: float = 300) -> dict:
        return self.wait_for(job_id, lambda job: job["JobState"] in FINAL, "a final state", timeout)

    def start_now(self, job_id: int) -> None:
        """Lift the ~2 minute BeginTime hold Slurm puts on a requeued job (`scontrol release` does not).

        Not within the second of the requeue: slurmd counts a job's new credential as revoked
        when it was made no later than the second its predecessor's was revoked, and kills the
        batch job at once ("Killing non-startable batch JobId=N: Job credential revoked").
        """
        time.sleep(2)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def cancel_all(self) -> None:
        """Kill whatever a failed test left in the queue, so that the next test has the nodes."""
        jobs = self.run("squeue", "-h", "-o", "%i").split()
        if jobs:
            subprocess.run(["scancel", "--full", "--signal=KILL", *jobs], env=self.env, capture_output=True)
            subprocess.run(["scancel", *jobs], env=self.env, capture_output=True)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", "-o", "%i").split() and time.monotonic() < deadline:
                time.sleep(0.5)
