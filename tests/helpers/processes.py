"""A job's whole process tree, for tests and benches that signal or kill it as a scheduler does.

`accelerate launch` starts its workers in their own sessions, and wandb's service has its own
too: a process group misses them, the parent links in /proc do not.
"""

import os
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """pid and every descendant, whatever their process group or session."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_tree(pid: int, number: int) -> None:
    """Send `number` to pid and every descendant at once (those already gone are skipped)."""
    for member in process_tree(pid):
        try:
            os.kill(member, number)
        except ProcessLookupError:
            pass
