"""The machine a measurement ran on, and this process's CPU memory: what the benchmarks and examples report, and
the one allocator setting a long-running server needs.

Memory comes from Linux's /proc: ``VmRSS`` is the resident set size now, ``VmHWM`` its peak ("high water mark"),
which writing ``5`` to ``/proc/self/clear_refs`` resets to the current size (proc(5)). Elsewhere these read as
``None``/``False``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe(device: torch.device, threads: int) -> dict[str, Any]:
    """What the numbers were measured on: CPU model (as ``lscpu`` names it), cores, threads, device, versions."""
    import transformers

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": threads,
                            "device": str(device), "python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or the platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def status_bytes(key: str, pid: int | str = "self", file: str = "status") -> int | None:
    """A ``kB`` field of ``/proc/<pid>/<file>`` in bytes (``"VmRSS"`` and ``"VmHWM"`` of ``status``, ``"Pss"`` of
    ``smaps_rollup``), or ``None`` where unavailable (not Linux, or the process has gone)."""
    try:
        lines = Path(f"/proc/{pid}/{file}").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak() -> bool:
    """Restart ``VmHWM`` from the current resident size; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def reset_peak_memory(device: torch.device) -> None:
    """Restart the peak-memory counter of ``device``: the CUDA allocator's, or the kernel's ``VmHWM`` (where that
    cannot be reset the CPU peak stays the process' lifetime peak, which can only hide growth, never invent it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak()


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes since ``reset_peak_memory``: allocated tensors on CUDA, resident memory (``VmHWM``) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return status_bytes("VmHWM")


M_MMAP_THRESHOLD = -3  # glibc's <malloc.h> option number for mallopt(3)
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit


def is_glibc() -> bool:
    """Whether this process runs on GNU libc (``confstr(_CS_GNU_LIBC_VERSION)`` exists only there)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # an unknown name, or no confstr at all (Windows)
        return False


def fix_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve new blocks of ``nbytes`` or more with their own ``mmap`` (returned to the system when freed)
    rather than by growing its heap.

    glibc's threshold is dynamic by default: each time an mmapped block is freed it raises the threshold to that
    block's size (up to 32 MiB), so later blocks of that size come from the heap instead. A process that runs for
    hours allocating blocks of varying sizes (a server prefilling prompts of varying lengths) fragments that heap
    and its resident memory creeps up though it holds no more tensors. Setting the threshold with ``mallopt`` also
    turns that adjustment off (mallopt(3)), which keeps such a process flat, much as ``MALLOC_MMAP_THRESHOLD_`` in
    the environment does from start-up (the trim threshold, which the adjustment may already have raised, is left
    as it is).

    Args:
        nbytes: the threshold, 1 byte to 32 MiB, glibc's own ceiling (``mallopt`` takes a C ``int``: a value past
            2 GiB would wrap silently, and one above the ceiling is not what a server wants).

    Returns True once set; False, changing nothing, where the C library is not glibc (musl, macOS, Windows) or
    glibc refused the value.
    """
    if not 0 < nbytes <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"The mmap threshold must be between 1 byte and {MAX_MMAP_THRESHOLD >> 20} MiB, got {nbytes}.")
    if not is_glibc():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
