"""Command line: `accelerated-trainer --config cfg.json [--set key=value ...]`.

The same command runs as `python -m accelerated_trainer`, as `python train.py` from a checkout,
and under `accelerate launch` (`accelerate launch -m accelerated_trainer ...` or `... train.py ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NoReturn

INVALID_INPUT_EXIT_CODE = 2  # the config or the data does not fit; the message says what to fix
PREEMPTED_EXIT_CODE = 99  # preempted or max_time_s: `last` is complete, relaunch with resume
LOST_PROCESS_EXIT_CODE = 3  # another process of the job died or hung
STOPPED_BY_FAULT_EXIT_CODE = 4  # a checkpoint write failed or the loss became NaN/inf
NOT_SAVED_EXIT_CODE = 5  # on_save_error "continue": training ended but its final state is not in `last`
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C: the first one saved `last` (resume to go on), a second one stopped at once

EPILOG = """\
overrides:
  --set takes a dotted config path and a value, parsed as JSON when it parses:
    --set training_options.n_epochs=3
    --set training_options.optimizer.lr=3e-4
    --set experiment_options.title=digits-wide --set experiment_options.resume=true
    --set 'model_options.kwargs.hidden_dims=[256,256]'
  All keys: configs/schema.json, or --schema.

launching (train.py in a checkout is the same command as accelerated-trainer):
  accelerated-trainer --config configs/digits.json                   one process
  python -m accelerated_trainer --config configs/digits.json         the same
  accelerate launch -m accelerated_trainer --config configs/digits.json      as `accelerate config` says
  accelerate launch train.py --config configs/digits.json            the same, from a checkout
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m accelerated_trainer --config ...   2 CPU processes

exit codes: 0 done; 1 a dependency is not installed, or a crash (traceback); 2 invalid config or
  data, or a run directory holding an earlier run (the message says what to fix); 3 another process
  of the job died or hung; 4 a checkpoint write failed or the loss became NaN/inf (earlier
  checkpoints intact); 5 training ended but its final state could not be saved
  (on_save_error: continue); 99 preempted (SIGTERM/SIGUSR1) or max_time_s spent, with a complete
  `last` checkpoint and {run_dir}/preempted.json: relaunch with --set experiment_options.resume=true;
  130 Ctrl-C: the first saves `last` like a preemption, a second stops at once.
"""


# The package's own dependencies, by import name: a missing one is a set-up problem, not a bug.
DEPENDENCIES = ("torch", "accelerate", "datasets", "safetensors", "wandb", "pydantic", "tqdm", "yaml", "numpy", "pyarrow")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="Train a PyTorch model from a JSON/YAML config with accelerate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", help="path to the JSON or YAML config")
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                        help="override one config value (repeatable)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or progress lines; the package's messages and summary only")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--print-run-dir", action="store_true", help="print the run directory (absolute) and exit")
    parser.add_argument("--schema", action="store_true", help="print the config's JSON Schema and exit")
    args = parser.parse_args(argv)
    if not (args.config or args.schema):
        parser.error("--config is required")
    return args


def _program_name() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "accelerated-trainer"
    return "python -m accelerated_trainer" if name == "__main__.py" else name


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (see EPILOG)."""
    try:
        return _run(argv)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in DEPENDENCIES:
            raise
        print(f"error: {err} in {sys.executable}: accelerated-trainer's dependencies are not installed for this "
              "Python. In a checkout run `make venv`, then `source .venv/bin/activate` (or call .venv/bin/python); "
              "elsewhere `pip install -e .` from the checkout, or `pip install accelerated-trainer`.", file=sys.stderr)
        return 1
    finally:
        _release_process_group()


def run_and_exit(argv: list[str] | None = None) -> NoReturn:
    """What `accelerated-trainer`, `python -m accelerated_trainer` and train.py run: main(), then
    leave the process with its exit code.

    After a run with several processes the process leaves at once (os._exit), skipping the
    interpreter's teardown. There, torch's distributed threads (gloo, the TCPStore) are sometimes
    still joinable and the C++ runtime aborts a process whose run succeeded ("terminate called
    without an active exception", SIGABRT: 3 of 30 two-process runs here, with the process group
    already destroyed), which a launcher or SLURM reports as a failed job. By then every
    checkpoint is complete, every file closed, and the trackers finished.
    """
    try:
        code = main(argv)
    except KeyboardInterrupt:  # a Ctrl-C outside the run (training is over, or not yet begun)
        print("interrupted.", file=sys.stderr)
        code = INTERRUPTED_EXIT_CODE
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    if "wandb" in sys.modules:
        try:
            sys.modules["wandb"].teardown()  # what its atexit hook would do: stop its service process
        except Exception:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _release_process_group() -> None:
    """Destroy the process group before the interpreter exits.

    Left to the exit, gloo's threads are sometimes still joinable while torch tears down, and a
    process whose run succeeded aborts ("terminate called without an active exception", SIGABRT),
    which the launcher reports as a failed job.
    """
    if "torch.distributed" not in sys.modules:  # --help and config errors never import torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(argv: list[str] | None) -> int:
    args = parse_args(argv)
    # Imported here so that --help answers without loading pydantic, torch or accelerate.
    from .config import ConfigError, json_schema, load_config

    if args.schema:
        print(json.dumps(json_schema(), indent=2))
        return 0
    overrides = args.overrides + (["experiment_options.progress_bar=false"] if args.quiet else [])
    try:
        config = load_config(args.config, overrides)
        if args.print_config:
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            return 0
        if args.print_run_dir:
            print(config.run_dir.absolute())
            return 0
        from .checkpoint.run_dir import RunDir

        # Refused before torch loads: the trainer applies the same rule before it changes anything.
        RunDir(config.run_dir).fresh_start_overwrites(config.experiment_options.resume, config.experiment_options.overwrite)
        from .preemption import hold

        hold(config.experiment_options.preemption_signals)  # a scheduler's signal during the set-up is not lost
        return _train(config)
    except KeyboardInterrupt:
        print("interrupted: stopped at once (a second Ctrl-C, or one during the set-up); the checkpoints written "
              "so far are complete: resume with --set experiment_options.resume=true.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return INVALID_INPUT_EXIT_CODE
    except Exception as err:
        # Imported here: importing torch would make config errors take seconds instead of milliseconds.
        from .data import DataError
        from .checkpoint import CheckpointError
        from .trainer import NonFiniteLossError

        if isinstance(err, DataError):
            print(f"error: {err}", file=sys.stderr)
            return INVALID_INPUT_EXIT_CODE
        if isinstance(err, (CheckpointError, NonFiniteLossError)):
            print(f"error: {err}", file=sys.stderr)
            return STOPPED_BY_FAULT_EXIT_CODE
        if not _lost_another_process(err):
            raise
        print(f"error: lost contact with another process of this job ({type(err).__name__}: {str(err).splitlines()[0]}). "
              "It probably died or hung: its own log says why. The last complete checkpoint is in "
              f"{config.run_dir / 'last'}; relaunch with --set experiment_options.resume=true.", file=sys.stderr)
        return LOST_PROCESS_EXIT_CODE


def _train(config) -> int:
    """Train as the config says: the preflight before, the preempted marker after; return the exit code."""
    from . import preempted_marker, preflight
    from .trainer import AcceleratedTrainer

    main_process = _is_main_process()
    if main_process:
        preempted_marker.clear(config.run_dir)  # a marker of an earlier launch must not outlive this one's start
    experiment = config.experiment_options
    preflight.check(config.run_dir, experiment.preflight_timeout_s, experiment.distributed_timeout_s, LOST_PROCESS_EXIT_CODE)
    result = AcceleratedTrainer(None, config).train()
    if result.save_error:
        return NOT_SAVED_EXIT_CODE
    if result.interrupted:  # Ctrl-C: a person stopped it, no scheduler is to requeue it
        return INTERRUPTED_EXIT_CODE
    if not result.preempted:
        return 0
    if main_process:
        preempted_marker.write(config.run_dir, result.steps, result.stop_reason)
    return PREEMPTED_EXIT_CODE


def _is_main_process() -> bool:
    # Read from the launcher's environment: the marker is handled before accelerate is imported.
    return os.environ.get("RANK", "0") == "0"


def _lost_another_process(err: Exception) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistBackendError", ())) or isinstance(err, getattr(dist, "DistNetworkError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe"))


if __name__ == "__main__":
    run_and_exit()
