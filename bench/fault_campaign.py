"""Kill training at random moments, resume, and count what was lost: a fault campaign anyone can rerun.

    python bench/fault_campaign.py --trials 30 --trials-2 10     # the README's figures (about 15 minutes)
    python bench/fault_campaign.py --quick                        # smoke run: 1 + 1 trials

Each trial launches the digits job (`configs/digits.json` with a wider MLP, two hidden layers of
--width, so that a save takes long enough to be cut short: 52 MB of weights and AdamW state at
2048; 4 epochs, a `last` save every 7 steps and at each epoch end, asynchronous saves, no
tracker) as a scheduler would, in its own process
session, with 1 process (`train.py`) or 2 (`accelerate launch`, gloo). At a random moment
between --earliest and --latest seconds after the launch (the set-up, the steps, the saves all
fall in that range) every process of the job is SIGKILLed at once. Then it is resumed
(`resume: true`) to the end and its final weights are compared with an uninterrupted run's.

Counted per trial:
  mid-save   a temporary checkpoint (`.last.tmp`, `.best.tmp`, `top/.*.tmp`) existed when it died
  lost       a checkpoint that verified right after the kill was not resumed from (or a newer
             one): the resume started afresh or from an older state
  corrupt    a checkpoint the index lists does not verify after the kill, or the resume failed
  bit-exact  the resumed run's final weights equal the uninterrupted run's, bit for bit
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, environment, table

sys.path.insert(0, str(REPO / "tests"))
from helpers.processes import signal_tree  # noqa: E402
from safetensors.torch import load_file

SETTINGS = ["training_options.n_epochs=4", "training_options.save_every_n_steps=7", "training_options.early_stopping=null",
            "experiment_options.trackers=[]", "experiment_options.progress_bar=false"]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


WIDTH = [2048]  # set by main() from --width


def command(run_root: Path, processes: int, port: int, *extra: str) -> list[str]:
    args = ["train.py", "--config", "configs/digits.json", "--set", f"experiment_options.ckpt_dir={run_root}"]
    settings = [*SETTINGS, f"model_options.kwargs.hidden_dims=[{WIDTH[0]},{WIDTH[0]}]", *extra]
    args += [a for setting in settings for a in ("--set", setting)]
    if processes == 1:
        return [sys.executable, *args]
    return [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args]


def env() -> dict[str, str]:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL every process of the job at once: the launcher, its workers (own sessions) and theirs."""
    signal_tree(process.pid, signal.SIGKILL)
    process.wait()


def verified(run_dir: Path) -> dict[str, int]:
    """{checkpoint: step} of the full states that verify."""
    from accelerated_trainer.checkpoint import files

    found = {}
    for name in ("last", "previous", "older", ".last.tmp"):
        if (run_dir / name).is_dir() and files.verify(run_dir / name) is None:
            found[name] = json.loads((run_dir / name / "state.json").read_text())["step"]
    return found


def listed_are_whole(run_dir: Path) -> bool:
    from accelerated_trainer.checkpoint import files

    index = run_dir / "checkpoints.json"
    if not index.is_file():
        return True
    listed = json.loads(index.read_text())
    paths = [entry["path"] for entry in listed["top_k"]] + [entry["path"] for entry in (listed["best"],) if entry]
    return all(files.verify(run_dir / path) is None for path in paths)


def trial(root: Path, processes: int, port: int, reference: dict, rng: random.Random, args) -> dict[str, bool]:
    run_dir = root / "digits-mlp"
    process = subprocess.Popen(command(root, processes, port), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(rng.uniform(args.earliest, args.latest * (1.6 if processes > 1 else 1.0)))
    kill_job(process)
    mid_save = any(run_dir.glob(".*.tmp")) or any(run_dir.glob("top/.*.tmp"))
    before = verified(run_dir) if run_dir.is_dir() else {}
    whole = listed_are_whole(run_dir) if run_dir.is_dir() else True
    resumed = subprocess.run(command(root, processes, port + 1, "experiment_options.resume=true"), cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=600)
    newest = max(before.values(), default=None)
    started_at = None
    for line in resumed.stdout.splitlines():
        if line.startswith("resume: continuing from"):
            started_at = int(line.rsplit("step ", 1)[1].rstrip("."))
    lost = newest is not None and (started_at is None or started_at < newest)
    exact = False
    if resumed.returncode == 0:
        final = load_file(str(run_dir / "last" / "model.safetensors"))
        exact = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    return {"mid-save": mid_save, "lost": lost, "corrupt": not whole or resumed.returncode != 0, "bit-exact": exact}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="trials with 1 process")
    parser.add_argument("--trials-2", type=int, default=10, help="trials with 2 processes")
    parser.add_argument("--earliest", type=float, default=2.0, help="seconds after the launch, at the soonest")
    parser.add_argument("--latest", type=float, default=9.0, help="seconds after the launch, at the latest (x1.6 for 2 processes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=2048, help="the MLP's two hidden layers: larger, longer saves")
    parser.add_argument("--quick", action="store_true", help="1 + 1 trials: a smoke run")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-trial outcomes here")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.trials_2, args.width = 1, 1, 256
    WIDTH[0] = args.width
    print(f"fault_campaign: {environment()}")
    rng = random.Random(args.seed)
    rows, outcomes = [], {}
    with tempfile.TemporaryDirectory(prefix="fault-campaign-") as tmp:
        for processes, trials in ((1, args.trials), (2, args.trials_2)):
            if not trials:
                continue
            straight = Path(tmp) / f"straight{processes}"
            done = subprocess.run(command(straight, processes, 29710), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                raise SystemExit(f"the uninterrupted {processes}-process run failed:\n{done.stderr[-3000:]}")
            reference = load_file(str(straight / "digits-mlp" / "last" / "model.safetensors"))
            results = []
            for n in range(trials):
                results.append(trial(Path(tmp) / f"p{processes}-{n}", processes, 29720 + 4 * n, reference, rng, args))
                print(f"{processes} process(es), trial {n + 1}/{trials}: {results[-1]}", flush=True)
            outcomes[processes] = results
            counts = {key: sum(r[key] for r in results) for key in ("mid-save", "lost", "corrupt", "bit-exact")}
            rows.append([str(processes), str(trials), str(counts["mid-save"]), str(counts["lost"]), str(counts["corrupt"]),
                         f"{counts['bit-exact']} / {trials}"])
    print(f"\n### SIGKILL at a random moment {args.earliest:g}-{args.latest:g} s after the launch, then resume (seed {args.seed}, "
          f"MLP 64-{args.width}-{args.width}-10)\n")
    print(table(["processes", "trials", "killed mid-save", "lost", "corrupt", "bit-exact"], rows))
    if args.json:
        args.json.write_text(json.dumps(outcomes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
