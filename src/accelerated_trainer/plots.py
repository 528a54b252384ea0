"""Plot runs from their metrics.jsonl: `python -m accelerated_trainer.plots RUN_DIR [RUN_DIR ...] -o out.png`.

One panel each for train_loss, every validation metric (keys starting with "val_") and lr, against
the optimizer step; one line per run. Needs matplotlib (`pip install "accelerated-trainer[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PANEL_INCHES = (5.0, 3.5)  # width, height of one panel
MAX_COLUMNS = 3


class PlotError(ValueError):
    """Runs that cannot be plotted; the message says why."""


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric of a run as {key: [(step, value), ...]} in step order.

    Non-finite values stored as strings ("nan", "inf") come back as nan, which a plot leaves as a gap.
    A resume after a crash appends again from the checkpoint's step: the values the crashed run
    logged past that step are dropped, as TensorBoard does.

    Raises:
        PlotError: the run directory has no metrics.jsonl.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl; pass a run directory ({{ckpt_dir}}/{{title}}) of a run that has logged.")
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        step = row.get("step") if isinstance(row, dict) else None
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            number = _number(value)
            if key == "step" or number is None:
                continue
            points = series.setdefault(key, [])
            while points and points[-1][0] >= step:  # a resumed run re-logging steps
                points.pop()
            points.append((step, number))
    return series


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else math.nan
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return math.nan
    return None


def panel_keys(runs: dict[str, dict[str, list]]) -> list[str]:
    """train_loss, the validation metrics (sorted), lr: those that at least one run logged."""
    logged = set().union(*(series for series in runs.values()))
    validation = sorted(key for key in logged if key.startswith("val_"))
    return [key for key in ("train_loss", *validation, "lr") if key in logged]


def plot_runs(run_dirs: list[str | Path], dpi: int = 100):
    """A matplotlib Figure with one panel per metric and one line per run, labelled by run directory name.

    Raises:
        PlotError: a run directory without metrics.jsonl, no metric to plot, or no matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError('plotting needs matplotlib: pip install matplotlib (or "accelerated-trainer[plot]").') from None
    runs = {label: read_metrics(run_dir) for label, run_dir in zip(_labels(run_dirs), run_dirs)}
    keys = panel_keys(runs)
    if not keys:
        raise PlotError(f"nothing to plot: no train_loss, val_* or lr values in {', '.join(map(str, run_dirs))}.")
    rows = -(-len(keys) // MAX_COLUMNS)
    columns = -(-len(keys) // rows)  # balanced: 4 panels are 2 x 2, not 3 + 1
    # Figure + Agg canvas rather than pyplot: no global figure registry, no GUI backend to pick.
    figure = Figure(figsize=(PANEL_INCHES[0] * columns, PANEL_INCHES[1] * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, series in runs.items():
            if key in series:
                steps, values = zip(*series[key])
                axes.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
        axes.set_title(key)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(runs) > 1:
            axes.legend(fontsize="small")
    return figure


def _labels(run_dirs: list[str | Path]) -> list[str]:
    # The directory name is the run's title; two runs of the same title in different ckpt_dirs keep their paths.
    names = [Path(run_dir).resolve().name for run_dir in run_dirs]
    return names if len(set(names)) == len(names) else [str(run_dir) for run_dir in run_dirs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="accelerated-trainer-plot",
        description="Plot train_loss, validation metrics and lr per step from runs' metrics.jsonl into a PNG.",
        epilog="example: python -m accelerated_trainer.plots runs/digits-mlp runs/digits-wide -o compare.png\n"
               "exit codes: 0 written, 2 a run directory without metrics.jsonl or nothing to plot.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory ({ckpt_dir}/{title}) holding metrics.jsonl")
    parser.add_argument("-o", "--output", default="metrics.png", help="PNG file to write (default: metrics.png)")
    parser.add_argument("--dpi", type=int, default=100, help="pixels per inch; each panel is 5 x 3.5 inches (default: 100)")
    args = parser.parse_args(argv)
    try:
        figure = plot_runs(args.run_dirs, dpi=args.dpi)
    except PlotError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
