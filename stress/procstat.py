"""
What a process costs, read from ``/proc`` (Linux only): resident memory,
open descriptors and CPU time.  No psutil: the stress run needs nothing
beyond the standard library and the project's own dependencies.
"""

from __future__ import annotations

import os
import resource
from typing import Dict

_TICKS = os.sysconf("SC_CLK_TCK")


def status(pid: int) -> Dict[str, int]:
    """The ``Vm*`` lines of /proc/PID/status, in KiB."""
    out: Dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    """Resident set size now."""
    return status(pid)["VmRSS"]


def hwm_kib(pid: int) -> int:
    """Peak resident set size since the process started (VmHWM)."""
    return status(pid)["VmHWM"]


def fd_count(pid: int) -> int:
    """Open file descriptors, from /proc/PID/fd."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces: split after its ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _TICKS


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except FileNotFoundError:
        return False
    return raw[raw.rindex(")") + 2 :].split()[0] != "Z"


def raise_nofile(want: int = 1 << 20) -> int:
    """
    Raise this process's RLIMIT_NOFILE soft limit towards ``want`` (at most
    the hard limit); returns the soft limit now in force.  Children inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
