"""Stopping policy as a pure decision: (values, patience, min_delta, mode) -> stop evaluation."""

import math

import pytest

from accelerated_trainer.early_stopping import EarlyStopping, is_improvement


def first_stop(values, patience, mode="min", min_delta=0.0):
    stopper = EarlyStopping(mode=mode, patience=patience, min_delta=min_delta)
    for index, value in enumerate(values):
        should_stop, reason = stopper.update(value)
        if should_stop:
            assert reason and f"in {patience} evaluations" in reason
            return index
    return None


@pytest.mark.parametrize(
    "values, patience, mode, min_delta, stop_at",
    [
        ([1.0, 0.9, 0.8, 0.7], 1, "min", 0.0, None),  # always improving
        ([1.0, 1.1, 1.2], 2, "min", 0.0, 2),  # two evaluations without improvement
        ([1.0, 1.0], 1, "min", 0.0, 1),  # equal is not better
        ([1.0, 0.97, 0.96, 0.9], 2, "min", 0.05, 2),  # improvements below min_delta do not count
        ([1.0, 0.97, 0.93, 0.9], 2, "min", 0.05, None),  # ... but add up against the best
        ([0.5, 0.6, 0.55, 0.58, 0.7], 3, "max", 0.0, None),  # the counter resets on improvement
        ([0.5, 0.6, 0.55, 0.58, 0.59], 3, "max", 0.0, 4),
        ([1.0, math.nan, math.nan], 2, "min", 0.0, 2),  # NaN never improves
        ([math.nan, 1.0, 2.0, 3.0], 2, "min", 0.0, 3),  # anything beats a NaN start
        ([math.nan], 1, "min", 0.0, 0),
    ],
)
def test_stop_evaluation(values, patience, mode, min_delta, stop_at):
    assert first_stop(values, patience, mode, min_delta) == stop_at


def test_state_survives_a_resume():
    stopper = EarlyStopping(mode="min", patience=3)
    for value in (1.0, 1.5, 1.6):
        stopper.update(value)
    restored = EarlyStopping(mode="min", patience=3)
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 1.0 and restored.evaluations_without_improvement == 2
    assert restored.update(1.7)[0] is True


def test_is_improvement_by_mode():
    assert is_improvement(0.5, 0.6, "min") and not is_improvement(0.5, 0.6, "max")
    assert is_improvement(0.5, None, "max")
    assert not is_improvement(math.nan, 1.0, "min")
