"""train.py with an atexit hook: it must not run after a multi-process run (the CLI leaves at once)."""

import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from accelerated_trainer import cli  # noqa: E402

atexit.register(lambda: print("interpreter teardown ran", flush=True))
cli.run_and_exit(sys.argv[1:])
