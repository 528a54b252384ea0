"""The command line as train.py runs it, then a few seconds more in the same process before it exits.

A signal sent in those seconds (a scheduler's SIGTERM arriving after training ended) must not
kill a process whose run is complete.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from accelerated_trainer import cli  # noqa: E402

code = cli.main(sys.argv[1:])
print("the command line returned", flush=True)
time.sleep(3)
sys.exit(code)
