"""host_memory.keep_freed_memory: large blocks a step frees are reused from malloc's heap, not
mapped and faulted in afresh at every step (glibc's default for blocks over 32 MB, and for
smaller ones depending on the order of allocations)."""

import subprocess
import sys

from conftest import REPO

STEPS = """
import ctypes, resource, sys
sys.path.insert(0, {src!r})
if {keep}:
    from accelerated_trainer import host_memory
    assert host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
SIZE = 48 << 20  # a large gradient's block, written in full as a step writes it
def step():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""
PAGES = (48 << 20) / 4096


def faults_per_step(keep: bool) -> float:
    code = STEPS.format(src=str(REPO / "src"), keep=keep)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    return float(out.split()[-1])


def test_a_block_freed_by_one_step_is_reused_by_the_next():
    assert faults_per_step(keep=False) > 0.9 * PAGES  # glibc's defaults: mapped afresh, every page faults again
    assert faults_per_step(keep=True) < 0.01 * PAGES


def test_glibc_tunables_in_the_environment_rule():
    code = "import sys; sys.path.insert(0, %r); from accelerated_trainer import host_memory; print(host_memory.keep_freed_memory())"
    env = {"MALLOC_TRIM_THRESHOLD_": "1000000", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code % str(REPO / "src")], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"
