"""The plot command: metrics.jsonl of one or several runs to a PNG of train_loss, val_* and lr per step."""

import json
import math
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from matplotlib.image import imread

from accelerated_trainer import plots
from accelerated_trainer.config import ExperimentOptions
from accelerated_trainer.tracking import Tracker

from conftest import REPO

NAN = float("nan")


def write_run(run_dir, train_losses, val_accuracies, lr=1e-3):
    """A run's metrics.jsonl as the trainer writes it (through Tracker): training rows every 10
    steps, validation rows every 23 steps (an epoch)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    tracker = Tracker(Accelerator(), ExperimentOptions(trackers=[]), run_dir, {})
    tracker.start()
    for index, loss in enumerate(train_losses, start=1):
        tracker.log({"train_loss": loss, "lr": lr / index, "epoch": 10 * index // 23, "samples_per_s": 1e4}, step=10 * index)
    for index, accuracy in enumerate(val_accuracies, start=1):
        tracker.log({"val_loss": 1 - accuracy, "val_accuracy": accuracy, "epoch": index, "best_val_accuracy": accuracy}, step=23 * index)
    tracker.finish({})
    return run_dir


@pytest.fixture
def two_runs(tmp_path):
    first = write_run(tmp_path / "digits-mlp", [2.0, 1.5, NAN, 1.0], [0.5, 0.8])
    second = write_run(tmp_path / "digits-wide", [2.2, 1.2, 0.9, 0.7, 0.6], [0.6, 0.9], lr=3e-3)
    return first, second


def line_data(figure):
    """{panel title: {line label: (steps, values)}} of a figure plot_runs drew."""
    return {axes.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
            for axes in figure.axes}


def same(left, right):
    return len(left) == len(right) and all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(left, right))


def test_read_metrics_keeps_numbers_and_reads_non_finite_as_gaps(two_runs):
    series = plots.read_metrics(two_runs[0])
    steps, losses = zip(*series["train_loss"])
    assert steps == (10, 20, 30, 40) and same(losses, [2.0, 1.5, NAN, 1.0])  # "nan" in the file
    assert series["val_accuracy"] == [(23, 0.5), (46, 0.8)]
    assert plots.panel_keys({"run": series}) == ["train_loss", "val_accuracy", "val_loss", "lr"]  # not best_val_*


def test_read_metrics_after_a_crash_and_resume(tmp_path):
    # Logged to step 30, crashed (the last line cut short), resumed from the checkpoint at step 20.
    rows = [{"step": 10, "train_loss": 3.0}, {"step": 20, "train_loss": 2.0}, {"step": 30, "train_loss": 1.0}]
    resumed = [{"step": 30, "train_loss": 1.5}, {"step": 40, "train_loss": "inf"}]
    text = "".join(json.dumps(row) + "\n" for row in rows) + '{"step": 40, "train_lo' + "\n"
    text += "".join(json.dumps(row) + "\n" for row in resumed)
    (tmp_path / "metrics.jsonl").write_text(text)
    steps, losses = zip(*plots.read_metrics(tmp_path)["train_loss"])
    assert steps == (10, 20, 30, 40) and same(losses, [3.0, 2.0, 1.5, NAN])


def test_plot_draws_one_line_per_run_on_each_panel(two_runs):
    figure = plots.plot_runs(list(two_runs))
    drawn = line_data(figure)
    assert list(drawn) == ["train_loss", "val_accuracy", "val_loss", "lr"]
    for run_dir in two_runs:
        series = plots.read_metrics(run_dir)
        for key, lines in drawn.items():
            steps, values = lines[run_dir.name]
            assert steps == [step for step, _ in series[key]] and same(values, [value for _, value in series[key]])
    assert drawn["val_accuracy"]["digits-wide"] == ([23, 46], [0.6, 0.9])
    assert all(axes.get_legend() is not None for axes in figure.axes)
    assert tuple(figure.get_size_inches()) == (10.0, 7.0)  # 4 panels: 2 x 2 of 5 x 3.5 inches


def test_main_writes_a_png_drawn_from_the_data(two_runs, tmp_path):
    both, wide = tmp_path / "both.png", tmp_path / "wide.png"
    assert plots.main([str(two_runs[0]), str(two_runs[1]), "-o", str(both)]) == 0
    assert plots.main([str(two_runs[1]), "-o", str(wide)]) == 0
    image = imread(both)
    assert image.shape[:2] == (700, 1000)  # 10 x 7 inches at 100 dpi
    assert not np.array_equal(image, imread(wide))
    assert plots.main([str(two_runs[1]), "-o", str(tmp_path / "big.png"), "--dpi", "50"]) == 0
    assert imread(tmp_path / "big.png").shape[:2] == (350, 500)


def test_command_line(two_runs, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    command = [sys.executable, "-m", "accelerated_trainer.plots"]
    done = subprocess.run([*command, *map(str, two_runs), "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert imread(out).shape[:2] == (700, 1000)
    missing = subprocess.run([*command, str(two_runs[0]), str(tmp_path / "nope"), "-o", str(tmp_path / "x.png")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert "nope: no metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "x.png").exists()
    (script,) = entry_points(group="console_scripts", name="accelerated-trainer-plot")
    assert script.load() is plots.main


def test_nothing_to_plot_exits_2(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "epoch": 0}\n')
    assert plots.main([str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
