"""``machine.fix_mmap_threshold``: the allocator setting ``sinkcache serve`` applies to keep its memory flat."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from sinkcache import machine

# In a fresh interpreter: free a 4 MiB block (glibc's dynamic threshold then rises to 4 MiB), allocate 1 MiB and
# print how many bytes glibc's mmapped blocks grew by (mallinfo2's hblkhd): 0 when the block came from the heap.
PROBE = r"""
import ctypes, sys
from sinkcache import machine

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    assert machine.fix_mmap_threshold(64 * 1024)
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblkhd - before)
libc.free(block)
"""

glibc_233 = pytest.mark.skipif(
    not machine.is_glibc() or not hasattr(ctypes.CDLL(None), "mallinfo2"),
    reason="needs glibc 2.33 or newer (mallopt and mallinfo2)")


def mmapped_growth(mode: str) -> int:
    # without the settings that would fix the threshold from start-up
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@glibc_233
def test_a_fixed_threshold_keeps_large_blocks_out_of_the_heap():
    assert mmapped_growth("fixed") >= 1 << 20


@glibc_233
def test_without_it_glibc_moves_the_threshold_and_large_blocks_land_in_the_heap():
    # the negative control: the drift that the fixed threshold exists to stop
    assert mmapped_growth("default") == 0


def test_off_glibc_it_changes_nothing_and_says_so(monkeypatch):
    def no_such_name(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(os, "confstr", no_such_name)  # what musl and macOS answer
    assert machine.is_glibc() is False
    assert machine.fix_mmap_threshold(64 * 1024) is False


@pytest.mark.parametrize("nbytes", [0, -1, (32 << 20) + 1, 3 << 30])
def test_a_threshold_outside_what_mallopt_takes_is_refused(nbytes):
    # 3 GiB would wrap in mallopt's C int and turn mmap off while reporting success
    with pytest.raises(ValueError, match="between 1 byte and 32 MiB"):
        machine.fix_mmap_threshold(nbytes)
