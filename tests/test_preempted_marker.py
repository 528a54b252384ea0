"""preempted_marker: which launch a marker speaks for, and the check the cluster script runs."""

import subprocess
import sys

import pytest

from accelerated_trainer import preempted_marker

from conftest import REPO

JOB_7 = {"SLURM_JOB_ID": "7"}  # Slurm leaves SLURM_RESTART_COUNT unset before the first requeue
JOB_7_RESTART_1 = {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "1"}
JOB_8 = {"SLURM_JOB_ID": "8", "SLURM_RESTART_COUNT": "0"}


@pytest.mark.parametrize("written_by, checked_by, mine", [
    (JOB_7, JOB_7, True),
    (JOB_7, {"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0"}, True),
    (JOB_7_RESTART_1, JOB_7_RESTART_1, True),
    (JOB_7, JOB_7_RESTART_1, False),  # an earlier attempt of the same job
    (JOB_7, JOB_8, False),            # another job using the same run directory
    (JOB_7, {}, False),               # a marker from a Slurm job, checked outside Slurm
    ({}, {}, True),                   # outside Slurm (cleared at every start instead)
    ({}, JOB_7, False),
])
def test_a_marker_speaks_only_for_the_attempt_that_wrote_it(tmp_path, written_by, checked_by, mine):
    preempted_marker.write(tmp_path, 12, "preempted by SIGUSR1", environ=written_by)
    assert preempted_marker.written_by_this_attempt(tmp_path, environ=checked_by) is mine
    assert preempted_marker.read(tmp_path)["step"] == 12


def test_no_marker_or_a_cleared_one_is_not_a_preemption(tmp_path):
    assert not preempted_marker.written_by_this_attempt(tmp_path, environ={})
    preempted_marker.write(tmp_path, 3, "max_time_s reached", environ={})
    preempted_marker.clear(tmp_path)
    preempted_marker.clear(tmp_path / "never-created")  # a first run has no run directory yet
    assert not preempted_marker.written_by_this_attempt(tmp_path, environ={})
    (tmp_path / preempted_marker.FILENAME).write_text("{trunc")  # not JSON: not a marker
    assert not preempted_marker.written_by_this_attempt(tmp_path, environ={})


def test_command_line_check_as_the_cluster_script_runs_it(tmp_path):
    def check(env):
        return subprocess.run([sys.executable, "-m", "accelerated_trainer.preempted_marker", str(tmp_path)],
                              env={"PYTHONPATH": str(REPO / "src"), **env}, capture_output=True, text=True).returncode

    preempted_marker.write(tmp_path, 5, "preempted by SIGTERM", environ=JOB_7)
    assert (check(JOB_7), check(JOB_7_RESTART_1), check({})) == (0, 1, 1)
