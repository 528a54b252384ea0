"""Run one bench against two commits of the package, alternated in one run, and compare medians.

    python bench/compare_commits.py 46e5051 HEAD --rounds 4 -- bench_step.py --workload tiny --variants hand,trainer --rounds 1
    python bench/compare_commits.py 46e5051 HEAD --rounds 2 -- bench_async_save.py --rounds 1 --warmup-rounds 0

Each commit's `src/` is exported with `git archive` into a temporary directory. Every round runs
the bench script of the working tree once per commit, the order alternating from round to
round, with that commit's package first on PYTHONPATH and `--json` set; the bench writes its
raw figures there. The report gives, per figure, the median over all rounds for each commit
and the ratio after/before. The bench's own options choose its variants and in-process rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from common import REPO, table


def export(commit: str, into: Path) -> Path:
    """The commit's tree under `into`; its src/ is what PYTHONPATH points at."""
    archive = into / "tree.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", commit], stdout=out, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree" / "src"


def flatten(raw: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], list[float]]:
    """{(workload, variant, figure): values} from a bench's nested JSON."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = list(value)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: compare_commits.py BEFORE AFTER [--rounds N] -- BENCH.py [bench options]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=4, help="runs of the bench per commit")
    args = parser.parse_args(argv[:split])
    bench, *bench_args = argv[split + 1:]
    names = {"before": args.before, "after": args.after}
    figures: dict[str, dict[tuple[str, ...], list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        sources = {}
        for which, commit in names.items():
            (Path(tmp) / which).mkdir()
            sources[which] = export(commit, Path(tmp) / which)
        for r in range(args.rounds):
            for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
                out = Path(tmp) / f"{which}-{r}.json"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(sources[which]), os.environ.get("PYTHONPATH", "")])}
                print(f"round {r + 1}/{args.rounds}: {bench} at {names[which]}", flush=True)
                subprocess.run([sys.executable, str(REPO / "bench" / bench), *bench_args, "--json", str(out)],
                               env=env, check=True, stdout=subprocess.DEVNULL)
                for key, values in flatten(json.loads(out.read_text())).items():
                    figures[which].setdefault(key, []).extend(values)
    rows = []
    for key in figures["before"]:
        before, after = figures["before"][key], figures["after"].get(key, [])
        if not before or not after:
            continue
        b, a = statistics.median(before), statistics.median(after)
        rows.append([" / ".join(key), f"{b:.3f}", f"{a:.3f}", f"{a / b:.3f}x", f"{len(before)} / {len(after)}"])
    print(f"\n### {bench} {' '.join(bench_args)}: {args.rounds} runs per commit, alternated; "
          f"before = {args.before}, after = {args.after}\n")
    print(table(["figure", "before (median)", "after (median)", "after / before", "n"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
