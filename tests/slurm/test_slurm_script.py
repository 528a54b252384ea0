"""launch/slurm_multinode.sbatch, unmodified, under a real Slurm: slurmctld + two slurmd on localhost.

Every stop path ends COMPLETED with the run resumed from the `last` written at the stop step
(the preempted marker, `last/state.json`, the job log's resume line and metrics.jsonl's steps
agree), a plain `scancel` ends the job, and a failure is never requeued.

Needs root and apt (the kit installs slurm-wlm and munge); marked `slurm`, run by `make test-slurm`
and .ci/run. The jobs run on CPU (the kit's nodes have no GPU), as a CPU partition would run them.
Configs are the digits data with wandb off (`trackers: []`): no tracker is needed here, and
the default wandb tracker crashes when Slurm sends SIGTERM to its service process (a separate issue).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, digits_config
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.slurm
SCRIPT = "launch/slurm_multinode.sbatch"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(2, tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster(slurm):
    yield slurm
    slurm.cancel_all()


class Run:
    """One submitted job of the script: its config, run directory and log."""

    def __init__(self, cluster: SlurmCluster, tmp_path: Path, *, nodes: int, processes_per_node: int = 1,
                 sbatch: tuple[str, ...] = (), args: tuple[str, ...] = (), **training):
        self.cluster, self.config = cluster, tmp_path / "config.json"
        config = digits_config(tmp_path / "runs", training_options={"log_every_n_steps": 1, **training})
        config["experiment_options"]["trackers"] = []
        self.config.write_text(json.dumps(config))
        self.run_dir = tmp_path / "runs" / config["experiment_options"]["title"]
        self.log = tmp_path / "job.out"
        env = {"CONFIG": str(self.config), "PROCESSES_PER_NODE": str(processes_per_node), "OMP_NUM_THREADS": "1"}
        if sys.prefix != sys.base_prefix:
            env["VENV"] = sys.prefix  # what the script activates: this test's interpreter and packages
        self.id = cluster.sbatch(f"--nodes={nodes}", "--cpus-per-task=2", f"--output={self.log}", *sbatch, SCRIPT,
                                 "--quiet", *args, env=env, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text() if self.log.is_file() else ""

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.text().count(text) < count:
            assert time.monotonic() < deadline, f"job {self.id}: no {text!r} in its log:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def wait_for_training(self, rows: int = 3, timeout: float = 300) -> None:
        """Until the run has logged `rows` steps: its signal handlers are installed."""
        deadline = time.monotonic() + timeout
        while len(self.train_steps()) < rows:
            assert time.monotonic() < deadline, f"job {self.id} never trained:\n{self.text()[-3000:]}"
            time.sleep(0.1)

    def train_steps(self) -> list[int]:
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        return [row["step"] for row in rows if "train_loss" in row]

    def last_state(self) -> dict:
        return json.loads((self.run_dir / "last" / "state.json").read_text())

    def wait_requeued(self, decision: str) -> dict:
        """Once the job is requeued and its stopped attempt has ended: what that attempt left."""
        self.cluster.wait_for(self.id, lambda job: job["JobState"] == "PENDING" and job["Restarts"] == "1",
                              "the requeue", timeout=300)
        self.wait_for_log(decision)
        marker = json.loads((self.run_dir / "preempted.json").read_text())
        return {"marker": marker, "last": self.last_state()}

    def assert_resumed_to_completion(self, stop: dict, reason: str) -> None:
        """The stop saved `last` at its step; the next attempt resumed there and trained to the end."""
        step, epoch = stop["last"]["step"], stop["last"]["epoch"]
        assert stop["marker"] == {"slurm_job_id": str(self.id), "slurm_restart_count": "0", "step": step,
                                  "reason": reason}
        job = self.cluster.wait_final(self.id)
        log = self.text()
        assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("COMPLETED", "1", "0:0"), log[-4000:]
        assert log.count("restart 0:") == 1 and log.count("restart 1:") == 1
        assert f"resume: continuing from {self.run_dir / 'last'} at epoch {epoch}, step {step}." in log
        final = self.last_state()
        assert final["step"] > step
        assert "run finished: completed" in log
        # Every step trained exactly once across the two attempts: none lost, none repeated.
        assert self.train_steps() == list(range(1, final["step"] + 1))
        assert "Traceback" not in log, log[-4000:]
        assert not (self.run_dir / "preempted.json").exists()  # cleared by the resumed run's start


def test_time_limit_warning_to_the_batch_shell_requeues_and_two_nodes_resume(cluster, tmp_path):
    # Slurm sends --signal's warning from a check it runs every 30 s: with a 1-minute limit
    # and @35 it reaches the batch shell 25-55 s after the start, once training is under way.
    # The run has no end of its own until then; given one after the requeue, it finishes.
    run = Run(cluster, tmp_path, nodes=2, n_epochs=100_000, sbatch=("--time=1", "--signal=B:USR1@35"))
    run.wait_for_training()
    stop = run.wait_requeued("requeueing job")
    assert "batch shell got SIGUSR1" in run.text()
    config = json.loads(run.config.read_text())
    config["training_options"]["n_epochs"] = stop["last"]["epoch"] + 1
    run.config.write_text(json.dumps(config))
    cluster.run("scontrol", "update", f"JobId={run.id}", "TimeLimit=10")  # no second warning
    cluster.start_now(run.id)
    run.assert_resumed_to_completion(stop, "preempted by SIGUSR1")
    assert "2 node(s) x 1 CPU process(es)" in run.text()


def test_scancel_usr1_to_the_steps_requeues_and_one_node_of_two_processes_resumes(cluster, tmp_path):
    run = Run(cluster, tmp_path, nodes=1, processes_per_node=2, n_epochs=30)
    run.wait_for_training()
    cluster.run("scancel", "--signal=USR1", str(run.id))  # no -b: the batch shell never sees it
    stop = run.wait_requeued("requeueing job")
    assert "batch shell got" not in run.text()
    cluster.start_now(run.id)
    run.assert_resumed_to_completion(stop, "preempted by SIGUSR1")
    assert stop["last"]["num_processes"] == 2 and "1 node(s) x 2 CPU process(es)" in run.text()


def test_scontrol_requeue_saves_and_two_nodes_resume(cluster, tmp_path):
    run = Run(cluster, tmp_path, nodes=2, n_epochs=30)
    run.wait_for_training()
    cluster.run("scontrol", "requeue", str(run.id))  # SIGTERM to every process; Slurm requeues
    stop = run.wait_requeued("Slurm has requeued job")
    cluster.start_now(run.id)
    run.assert_resumed_to_completion(stop, "preempted by SIGTERM")


def test_plain_scancel_ends_the_job(cluster, tmp_path):
    run = Run(cluster, tmp_path, nodes=1, n_epochs=1000)
    run.wait_for_training()
    cluster.run("scancel", str(run.id))
    # The trainer saves on the SIGTERM and marks the stop preempted; the script must still not requeue.
    run.wait_for_log("not requeued")
    assert f"job {run.id} is COMPLETING (cancelled, or ended by Slurm): not requeued" in run.text()
    time.sleep(2)  # a requeue, if any, would have come from the script's last command, just run
    job = cluster.wait_final(run.id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "0"), run.text()[-3000:]
    assert (run.run_dir / "preempted.json").is_file() and run.last_state()["step"] >= 3


def test_a_failure_is_not_requeued_even_with_a_marker_of_its_own_attempt(cluster, tmp_path):
    # Held at submission, so that a marker naming this very job attempt can be planted first.
    run = Run(cluster, tmp_path, nodes=1, sbatch=("--hold",), args=("--set", "dataset_options.label_column=nope"))
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "preempted.json").write_text(json.dumps(
        {"slurm_job_id": str(run.id), "slurm_restart_count": "0", "step": 5, "reason": "preempted by SIGUSR1"}))
    cluster.run("scontrol", "release", str(run.id))
    job = cluster.wait_final(run.id)
    log = run.text()
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("FAILED", "0", "2:0"), log[-3000:]
    assert "error: dataset_options.label_column: column 'nope'" in log
    assert "stopped preempted" not in log and not (run.run_dir / "preempted.json").exists()
    assert "Traceback" not in log  # the launcher passes the workers' 2 on in one line


def test_an_invalid_config_fails_before_anything_starts(cluster, tmp_path):
    run = Run(cluster, tmp_path, nodes=2, args=("--set", "training_options.n_epoch=3"))
    job = cluster.wait_final(run.id)
    log = run.text()
    assert (job["JobState"], job["Restarts"], job["ExitCode"]) == ("FAILED", "0", "2:0"), log
    assert "training_options.n_epoch (from --set training_options.n_epoch=3): unknown key; did you mean 'training_options.n_epochs'" in log
    assert "training step" not in log  # srun never ran
