"""The CPU host-memory policy (trainer/host_memory.py): memory a step frees is reused, not faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Five "steps", each allocating, touching and freeing 3 x 24 MiB (blocks under glibc's largest mmap
# threshold, 72 MiB in all: over its largest trim threshold); prints the minor page faults of the last
# step. argv[1] == "keep" applies the policy first.
_PROBE = """
import ctypes, resource, sys
from moesaic.trainer.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
for step in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(24 << 20) for _ in range(3)]
    for block in blocks:
        libc.memset(block, 1, 24 << 20)
    for block in blocks:
        libc.free(block)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _last_step_faults(policy: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, policy], check=True, capture_output=True, text=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_without_page_faults() -> None:
    # 72 MiB = 18432 pages of 4 KiB: under glibc's default the heap top is trimmed after every step, so
    # every page faults again; with the policy the last step reuses the pages of the steps before.
    _, faults_system = _last_step_faults("system")
    applied, faults_kept = _last_step_faults("keep")
    assert applied == "True"
    assert faults_system > 15000, faults_system
    assert faults_kept < 100, faults_kept
