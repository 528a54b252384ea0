"""Launcher: `accelerate launch train.py --config configs/digits.json` (or `python train.py ...`).

The same command as the installed `accelerated-trainer` and `python -m accelerated_trainer`;
everything lives in the accelerated_trainer package; see `python train.py --help`.
"""

import sys
from pathlib import Path

try:
    from accelerated_trainer.cli import run_and_exit
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from accelerated_trainer.cli import run_and_exit

if __name__ == "__main__":
    run_and_exit()
