"""Resident-memory measurement for tests and benchmarks (Linux ``/proc``): the process's current and peak resident
set, and a baseline that makes the peak measure only what runs after it.

``ru_maxrss`` alone misleads when the process's peak before the measured step is already high, and freed heap that
glibc kept is reused without raising the resident set: growth measured that way swings with whatever ran before.
:func:`reset_peak` returns the freed heap to the OS and resets the kernel's high-water mark, so
``vm_bytes("VmHWM") - base`` is the memory the measured code needed.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def vm_bytes(key: str) -> int:
    """A byte count from ``/proc/self/status`` (``VmRSS``, ``VmHWM``) or a counter from ``/proc/self/io``
    (``rchar``).

    Raises:
        StopIteration: ``key`` is not a field of that file.
    """
    file = "io" if key == "rchar" else "status"
    line = next(x for x in Path(f"/proc/self/{file}").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * (1 if key == "rchar" else 1024)


def reset_peak() -> int:
    """Collects garbage, returns glibc's free heap to the OS, sets the high-water mark ``VmHWM`` to the current
    resident set (Linux >= 4.0), and returns that resident set in bytes: the baseline for ``vm_bytes("VmHWM")``.

    Raises:
        OSError: not Linux (no ``/proc/self/clear_refs`` or no glibc).
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    return vm_bytes("VmRSS")
