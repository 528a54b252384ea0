"""Run the CLI as train.py does, then report whether the process group is still up.

Left to the interpreter's exit, a gloo process group sometimes aborts the process after a run
that succeeded ("terminate called without an active exception", SIGABRT): the CLI must have
destroyed it before returning.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from accelerated_trainer import cli  # noqa: E402

code = cli.main(sys.argv[1:])
import torch.distributed as dist  # noqa: E402

print(f"rank {os.environ.get('RANK')}: process group up after the CLI returned: {dist.is_initialized()}", flush=True)
sys.exit(code)
