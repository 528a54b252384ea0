"""Where the trainer's step time goes: py-spy samples of the tiny workload, as a call tree.

    python bench/profile_step.py                   # 15000 steps sampled at 250 Hz (about a minute)
    python bench/profile_step.py --raw prof.raw    # keep the samples (py-spy's collapsed stacks)

Runs `bench_step.py --workload tiny --variants trainer` under `py-spy record --nonblocking`
(py-spy is in the `bench` extra; it reads the process's memory and does not pause it), keeps
the samples taken inside the trainer's epoch loop, and prints each frame's share of them
(inclusive), then the frames where the samples land (self). Shares, not absolute times: the
sampler takes CPU from the run, so the step is slower under it than in bench_step.py.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from common import REPO

ANCHOR = "_train_epoch (accelerated_trainer/"


def record(raw: Path, steps: int, rate: int) -> None:
    command = ["py-spy", "record", "--nonblocking", "--format", "raw", "-r", str(rate), "-o", str(raw), "--",
               sys.executable, str(REPO / "bench" / "bench_step.py"), "--workload", "tiny", "--variants", "trainer",
               "--rounds", "1", "--tiny-steps", str(steps)]
    subprocess.run(command, check=True)


def _short(frame: str, by_line: bool) -> str:
    frame = re.sub(r"\(.*?(site-packages|src)/", "(", frame)
    return frame if by_line else re.sub(r":\d+\)$", ")", frame)


def load(raw: Path, by_line: bool = False) -> tuple[Counter, int]:
    """Stacks below the epoch loop (outermost first) and their sample counts."""
    stacks: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        starts = [i for i, frame in enumerate(frames) if ANCHOR in frame]
        if starts:
            stacks[tuple(_short(f, by_line) for f in frames[starts[0] + 1:])] += int(count)
    return stacks, sum(stacks.values())


def tree(stacks: Counter, total: int, depth: int, min_share: float) -> list[str]:
    inclusive: dict[tuple, int] = defaultdict(int)
    for stack, count in stacks.items():
        for d in range(1, min(len(stack), depth) + 1):
            inclusive[stack[:d]] += count
    children: dict[tuple, list[tuple]] = defaultdict(list)
    for path in inclusive:
        children[path[:-1]].append(path)
    lines: list[str] = []

    def walk(prefix: tuple) -> None:
        for path in sorted(children[prefix], key=lambda p: -inclusive[p]):
            share = 100 * inclusive[path] / total
            if share >= min_share:
                lines.append(f"{'  ' * (len(path) - 1)}{share:5.1f}%  {path[-1]}")
                walk(path)

    walk(())
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15000)
    parser.add_argument("--rate", type=int, default=250, help="samples per second (keep it low on few cores)")
    parser.add_argument("--depth", type=int, default=6, help="levels of the call tree below the epoch loop")
    parser.add_argument("--min-share", type=float, default=1.0, help="hide frames under this percentage")
    parser.add_argument("--by-line", action="store_true", help="one node per calling line, not per function")
    parser.add_argument("--raw", type=Path, help="keep (or, if it exists, reuse) the raw samples here")
    args = parser.parse_args(argv)
    if args.raw is None or not args.raw.exists():
        if shutil.which("py-spy") is None:
            parser.error("py-spy is not installed: pip install py-spy (or pip install -e \".[bench]\")")
        raw = args.raw or Path(tempfile.mkdtemp(prefix="profile-step-")) / "trainer.raw"
        record(raw, args.steps, args.rate)
    else:
        raw = args.raw
    stacks, total = load(raw, args.by_line)
    if not total:
        print(f"no samples inside {ANCHOR!r}: did the trainer run?", file=sys.stderr)
        return 1
    print(f"\n### trainer epoch loop, {total} samples: inclusive share per frame\n")
    print("\n".join(tree(stacks, total, args.depth, args.min_share)))
    leaves: Counter = Counter()
    for stack, count in stacks.items():
        leaves[stack[-1] if stack else "(epoch loop itself)"] += count
    print("\n### where the samples land (self), top 25\n")
    for frame, count in leaves.most_common(25):
        print(f"{100 * count / total:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
