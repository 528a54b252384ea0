"""What the trainer prints: one-per-job messages and the end-of-run summary."""

from __future__ import annotations

from .state import TrainResult


def say(accelerator, message: str) -> None:
    """Print once per job (accelerator.print prints once per machine)."""
    if accelerator.is_main_process:
        print(message, flush=True)


def summary(result: TrainResult, seconds: float, kept) -> str:
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.6g}"
    lines = [
        "", f"run finished: {result.stop_reason}",
        f"  run directory   {result.run_dir}",
        f"  epochs / steps  {result.epochs} / {result.steps} in {seconds:.1f} s",
        f"  best {result.monitor:<10} {best}  ({result.best_checkpoint or 'no validation'})",
        f"  last checkpoint {result.last_checkpoint}",
        f"  top-k           {', '.join(e.path for e in kept) or '-'}",
    ]
    return "\n".join(lines)
