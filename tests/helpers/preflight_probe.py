"""One process of a preflight test: `preflight.check` as train.py runs it, or a process that misbehaves.

PROBE=check (default): run the preflight on RUN_DIR; print "preflight passed", or the error and exit 2.
PROBE=join-and-hang: join the process group, then never take part in the all-reduce.
The launcher's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) come from the test.
"""

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch.distributed as dist  # noqa: E402

from accelerated_trainer import preflight  # noqa: E402
from accelerated_trainer.config import ConfigError  # noqa: E402


def probe() -> int:
    if os.environ.get("PROBE", "check") == "join-and-hang":
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        time.sleep(60)
        return 0
    try:
        preflight.check(Path(os.environ["RUN_DIR"]), float(os.environ["PREFLIGHT_TIMEOUT_S"]), 60, exit_code=3)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("preflight passed")
    return 0


code = probe()
# As train.py leaves: the process group destroyed, then at once (gloo's threads can abort a
# normal interpreter exit, see cli.run_and_exit).
if dist.is_initialized():
    dist.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
