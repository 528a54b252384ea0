"""The README's commands, copied in the order written, on a fresh copy of the repository.

The README's ```bash and ```python blocks run in one bash session (so `source .venv/bin/activate`
carries on), in a `git archive` of HEAD that reuses this checkout's .venv. ```text, ```json and
unlabelled blocks are synopses, configs and trees, not commands. Two kinds of edit keep the
run short, each by a rule below: training commands stop after TIME_LIMIT, and the commands that
SKIPPED lists (with the reason) do not run. Every rule must apply to some command of the README.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

# Training stops after 40 optimizer steps (2 epochs of digits) and validates every 20, so every
# run still leaves best, top-k and last checkpoints for the commands that read them.
TIME_LIMIT = ["training_options.max_steps=40", "training_options.eval_every_n_steps=20"]
TRAINS = re.compile(r"(train\.py|accelerated[-_]trainer)\b.*--config\b")

SKIPPED = {
    r"^make test\b": "the whole test suite (about 11 minutes), which runs this test",
    r"^pip install\b": "installs packages from the network into the .venv this test shares",
    r"^python bench/": "benchmarks of minutes; tests/test_bench_smoke.py runs each with --quick",
    r"^(\w+=\S+ )*sbatch\b": "submits to a Slurm cluster; tests/slurm/ runs the script under a real one (make test-slurm)",
}


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block of the README, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: one per line, with `\\` continuations joined."""
    return [command for command in code.replace("\\\n", " ").splitlines() if command.strip()]


def skip_rule(command: str) -> str | None:
    """The SKIPPED rule that matches the command, if any."""
    return next((rule for rule in SKIPPED if re.match(rule, command.strip())), None)


def shortened(command: str) -> str:
    """The command with TIME_LIMIT added where it trains."""
    limit = " ".join(f"--set {setting}" for setting in TIME_LIMIT)
    code = command.partition(" #")[0].rstrip()  # a trailing comment (none of the README's has " #" in quotes)
    if code.strip() == "make train":
        return f"{code} ARGS='{limit}'"
    if TRAINS.search(code):
        return f"{code} {limit}"
    return code


def shortened_python(code: str) -> str:
    """A Python block with TIME_LIMIT among the overrides of its load_config calls."""
    overrides = ", ".join(f'"{setting}"' for setting in TIME_LIMIT)
    return re.sub(r"load_config\(([^,\[]+), \[", rf"load_config(\1, [{overrides}, ", code)


def readme_script(text: str, workdir: Path) -> tuple[str, list[str], set[str]]:
    """The bash script that runs the README, the commands it runs, and the skip rules it used."""
    lines, commands, used = ["set -euo pipefail"], [], set()
    for number, (language, code) in enumerate(readme_blocks(text)):
        if language == "python":
            path = workdir / f"readme_block_{number}.py"
            path.write_text(shortened_python(code))
            code = f"python {path}"
        elif language not in ("bash", "sh"):
            continue
        for command in shell_commands(code):
            rule = skip_rule(command)
            if rule:
                used.add(rule)
                continue
            commands.append(command)
            lines += [f"echo '@@@ command {len(commands)}'", shortened(command)]
    return "\n".join(lines) + "\n", commands, used


def test_the_rules_read_the_readme_as_intended(tmp_path):
    text = (REPO / "README.md").read_text()
    script, commands, used = readme_script(text, tmp_path)
    assert used == set(SKIPPED), f"a skip rule matches no README command: {set(SKIPPED) - used}"
    assert commands[0].startswith("make train") and commands[1].startswith("source .venv/bin/activate")
    assert any(TRAINS.search(c) and "accelerate launch" in c for c in commands), "the accelerate example runs"
    assert "--set training_options.max_steps=40" in script and "ARGS='--set training_options.max_steps=40" in script
    assert 'load_config("configs/digits.json", ["training_options.max_steps=40", ' in (tmp_path / next(
        p.name for p in tmp_path.glob("readme_block_*.py") if "load_config" in p.read_text())).read_text()


def fresh_copy(destination: Path) -> Path:
    """HEAD as a fresh clone has it, with this checkout's .venv (its editable install left alone)."""
    destination.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    venv = Path(sys.prefix)
    (destination / ".venv").symlink_to(venv)
    # make would reinstall into the shared .venv (pointing it at this copy) if pyproject.toml
    # looked newer than the install: give the copy's the install's own age.
    installed = (venv / ".installed").stat().st_mtime
    os.utime(destination / "pyproject.toml", (installed - 1, installed - 1))
    return destination


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs the git checkout")
def test_readme_commands_run_in_order_on_a_fresh_copy(tmp_path):
    assert (Path(sys.prefix) / ".installed").is_file(), "run the tests with .venv/bin/python after `make venv`"
    repo = fresh_copy(tmp_path / "repo")
    script, commands, _ = readme_script((repo / "README.md").read_text(), tmp_path)
    env = {key: value for key, value in os.environ.items()
           if key not in ("WANDB_MODE", "VIRTUAL_ENV", "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "PYTHONPATH")}
    # A newcomer's machine: no W&B account (offline runs), the system PATH, the copy's code
    # (ahead of the editable install, which points at this checkout).
    env.update(HOME=str(tmp_path / "home"), WANDB_API_KEY="", PYTHONPATH=str(repo / "src"),
               PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(sys.prefix) / "bin"))
    result = subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    ran = re.findall(r"^@@@ command (\d+)$", result.stdout, flags=re.M)
    failed = commands[int(ran[-1]) - 1] if ran else "(none)"
    assert result.returncode == 0, f"README command failed: {failed}\n{output[-4000:]}"
    assert len(ran) == len(commands)
    assert "\x1b[" not in output, "escape codes in redirected output"
    for path in ("runs/digits-mlp/best", "runs/digits-wide/last", "runs/digits-api/last", "runs/shakespeare-char/last",
                 "exported/digits/model.safetensors", "compare.png", "digits.png"):
        assert (repo / path).exists(), path
    # What the commands wrote is all ignored by git (.venv here is this test's link).
    archived = set(subprocess.run(["git", "ls-tree", "--name-only", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  check=True).stdout.split())
    written = sorted(p.name + "/" * p.is_dir() for p in repo.iterdir() if p.name not in archived | {".venv"})
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert written and ignored == written, f"not in .gitignore: {set(written) - set(ignored)}"
