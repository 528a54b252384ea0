"""NOT RUN YET: written without a GPU machine (issue 18); see bench/gpu_fsdp_check.sh, which runs it.

The trainer's FSDP2 path on GPUs: train.py under `accelerate launch --config_file
launch/fsdp_1node_8gpu.yaml` (accelerate's FSDP2 plugin shards the model in `prepare`, NCCL;
the sharded store's collectives on its own gloo group), with two switches for the check:

    GPU_CHECK_KILL_AT_STEP=N          the main process SIGKILLs itself right after optimizer step N
    GPU_CHECK_FORBID_UNPICKLING=1     pickle.load, pickle.loads, pickle.Unpickler and torch.load
                                      raise from the moment the run resumes
    python bench/gpu_fsdp_check.py --compare A B
                                      two checkpoints' weights (sharded or not, read on the CPU):
                                      bit for bit, or how far apart, and their grad scaler's scale;
                                      exits 1 when they differ by more than --tolerance
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def forbid_unpickling() -> None:
    import pickle

    import torch
    import torch.serialization

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling while resuming a sharded checkpoint")

    pickle.load = pickle.loads = pickle.Unpickler = refuse
    torch.load = torch.serialization.load = refuse


def arm() -> None:
    from accelerated_trainer.checkpoint import Checkpointer
    from accelerated_trainer.trainer import AcceleratedTrainer

    if os.environ.get("GPU_CHECK_FORBID_UNPICKLING") == "1":
        resume = Checkpointer.resume

        def resume_without_unpickling(self):
            forbid_unpickling()
            return resume(self)

        Checkpointer.resume = resume_without_unpickling
    if kill_at := int(os.environ.get("GPU_CHECK_KILL_AT_STEP", "0")):
        after_step = AcceleratedTrainer._after_optimizer_step

        def _after_optimizer_step(self):
            if self.state.step + 1 == kill_at and self.accelerator.is_main_process:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return after_step(self)

        AcceleratedTrainer._after_optimizer_step = _after_optimizer_step


def compare(a: Path, b: Path, tolerance: float) -> int:
    import torch

    from accelerated_trainer.checkpoint import files
    from accelerated_trainer.checkpoint.store import read_weights

    first, second = read_weights(a), read_weights(b)
    assert first.keys() == second.keys(), sorted(first.keys() ^ second.keys())[:5]
    diff = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    equal = all(torch.equal(first[k], second[k]) for k in first)
    states = [files.read_json(Path(d) / "state.json") for d in (a, b)]
    scales = [(state.get("scaler") or {}).get("scale") for state in states]
    print(json.dumps({"compare": [str(a), str(b)], "steps": [s["step"] for s in states], "bit_exact": equal,
                      "max_abs_diff": diff, "scaler_scale": scales}), flush=True)
    return 0 if (equal or diff <= tolerance) and scales[0] == scales[1] and states[0]["step"] == states[1]["step"] else 1


def main() -> None:
    if "--compare" in sys.argv:
        parser = argparse.ArgumentParser(description="compare two checkpoints' weights")
        parser.add_argument("--compare", nargs=2, type=Path, required=True)
        parser.add_argument("--tolerance", type=float, default=0.0)
        args = parser.parse_args()
        sys.exit(compare(*args.compare, args.tolerance))
    from accelerated_trainer import cli

    arm()
    cli.run_and_exit(sys.argv[1:])


if __name__ == "__main__":
    main()
