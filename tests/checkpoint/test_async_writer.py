"""The snapshot buffers and the background thread of asynchronous `last` saves."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from accelerated_trainer.checkpoint.async_writer import WRITE_PAUSE, PendingSave, Staging


def test_staging_copies_into_buffers_it_keeps_from_save_to_save():
    staging = Staging()
    weight, step = torch.randn(3, 4), torch.tensor(5.0)
    first = staging.copy({"w": weight, "step": step}, "optimizer")
    assert torch.equal(first["w"], weight) and torch.equal(first["step"], step)
    assert first["w"].data_ptr() != weight.data_ptr(), "a copy, not a view of the live tensor"

    weight.add_(1)  # the optimizer step changes the live tensor, never the copy
    assert not torch.equal(first["w"], weight)
    second = staging.copy({"w": weight, "step": step}, "optimizer")
    assert second["w"].data_ptr() == first["w"].data_ptr(), "the next save reuses the buffer"
    assert torch.equal(second["w"], weight)


def test_staging_keeps_groups_apart_and_reallocates_when_a_shape_or_dtype_changes():
    staging = Staging()
    model = staging.copy({"w": torch.zeros(2)}, "model")
    optimizer = staging.copy({"w": torch.ones(2)}, "optimizer")
    assert model["w"].data_ptr() != optimizer["w"].data_ptr()
    assert torch.equal(model["w"], torch.zeros(2))

    grown = staging.copy({"w": torch.ones(3)}, "model")
    assert grown["w"].shape == (3,) and torch.equal(grown["w"], torch.ones(3))
    halved = staging.copy({"w": torch.ones(3, dtype=torch.float16)}, "model")
    assert halved["w"].dtype == torch.float16
    staging.release()
    assert staging.copy({"w": torch.ones(3, dtype=torch.float16)}, "model")["w"].data_ptr() != halved["w"].data_ptr()


def test_pending_save_lets_training_go_on_once_captured_and_reports_the_result_later(tmp_path):
    may_finish = threading.Event()

    def attempt(captured, pause):
        captured()
        may_finish.wait(timeout=30)
        return "disk full"

    pending = PendingSave(None, attempt, tmp_path / "last", tmp_path / ".last.tmp", "intact.")
    assert pending.captured.wait(timeout=30)
    assert not pending.done(), "captured long before the write ends"
    may_finish.set()
    assert pending.result() == "disk full"


@pytest.mark.parametrize("where", ["before", "after"])
def test_pending_save_that_crashes_releases_training_and_cleans_up(tmp_path, where):
    cleanup = tmp_path / ".last.tmp"
    cleanup.mkdir()

    def attempt(captured, pause):
        if where == "after":
            captured()
        raise MemoryError("staging buffer")

    pending = PendingSave(None, attempt, Path(tmp_path / "last"), cleanup, "The earlier checkpoints are intact.")
    assert pending.captured.wait(timeout=30), "a failed save never holds the optimizer step"
    message = pending.result()
    assert "MemoryError: staging buffer" in message and message.endswith("The earlier checkpoints are intact.")
    assert isinstance(pending.crash, MemoryError)
    assert not cleanup.exists()


def test_a_paced_save_goes_flat_out_once_someone_waits_for_it(tmp_path):
    seen = []

    def attempt(captured, pause):
        captured()
        seen.append(pause())
        for _ in range(3000):  # until result() is called
            if pause() == 0:
                seen.append(0.0)
                return None
            threading.Event().wait(0.01)
        return "never waited for"

    pending = PendingSave(None, attempt, tmp_path / "last", tmp_path / ".last.tmp", "intact.", pace_for=60)
    assert pending.captured.wait(timeout=30)
    assert pending.result() is None
    assert seen[0] > 0 and seen[-1] == 0


def test_a_save_paces_itself_only_for_the_time_it_was_given(tmp_path):
    def attempt(captured, pause):
        captured()
        return None

    paced = PendingSave(None, attempt, tmp_path / "last", tmp_path / ".last.tmp", "intact.", pace_for=60)
    unpaced = PendingSave(None, attempt, tmp_path / "last", tmp_path / ".last.tmp", "intact.", pace_for=0)
    assert paced.pause() == WRITE_PAUSE > 0
    assert unpaced.pause() == 0
    paced.result(), unpaced.result()
    assert paced.pause() == 0, "waited for: flat out"
