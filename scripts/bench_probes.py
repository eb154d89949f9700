"""What this host's ``/proc`` says during ``make bench`` (``scripts/bench.py``): the CPU a process used, the
CPU of the PostgreSQL backends serving some databases, and the share of the cores that was busy or stolen by the
hypervisor. Linux only; elsewhere every reading is empty (zeros or None) rather than an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK_S = 1 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def span(start: float | None, end: float | None) -> float | None:
    """``end - start``, or None when either reading failed."""
    return None if start is None or end is None else end - start


def is_local_backend(pid: int) -> bool:
    """Whether ``pid`` (a ``pg_backend_pid()``) is a PostgreSQL process on this host: a server on another host, or
    in a container with its own process ids, names processes this host's /proc does not show, or shows as others."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"postgres")
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used, from /proc; None if it is not readable here. In clock
    ticks (10 ms on Linux), so a figure resolves what it sums over many statements, not one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * _TICK_S
    except (OSError, IndexError, ValueError):
        return None


class BackendCpu:
    """CPU seconds used by the PostgreSQL backends serving some databases, sampled from /proc.

    Backends exit with their worker, so they are sampled while the workers drain; the last sample of each
    is what it used (at most one sampling interval is missed per backend).
    """

    def __init__(self, databases: tuple[str, ...]) -> None:
        self.databases = tuple(f" {name} " for name in databases)
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._ignored: set[int] = set()

    def sample(self) -> None:
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return
        for pid in pids:
            if pid in self._ignored:
                continue
            try:
                if pid not in self.last:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    if not cmdline.startswith("postgres:") or not any(db in cmdline for db in self.databases):
                        self._ignored.add(pid)
                        continue
            except OSError:
                continue
            used = proc_cpu_s(pid)
            if used is None:
                continue
            self.first.setdefault(pid, used)
            self.last[pid] = used

    def seconds(self, *, new_from_zero: set[int]) -> float:
        return sum(self.last[pid] - (0.0 if pid in new_from_zero else self.first[pid]) for pid in self.last)


@dataclass(frozen=True)
class MachineCpu:
    """Jiffies of all cores from /proc/stat (zeros where there is none): busy, stolen, and all of them.

    ``steal`` is time a virtual machine's cores were ready to run but the hypervisor ran another guest: on a
    shared cloud VM it comes and goes with the neighbours, and a drain that lost a tenth of its cores to it is
    not a figure of the code. It is not counted as busy (the kernel counts it apart from user and system time).
    """

    busy: int = 0
    steal: int = 0
    total: int = 0

    @classmethod
    def read(cls) -> MachineCpu:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return cls()
        # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user time.
        fields = fields[:8]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        steal = fields[7] if len(fields) > 7 else 0
        return cls(sum(fields) - idle - steal, steal, sum(fields))

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(self.busy - other.busy, self.steal - other.steal, self.total - other.total)

    @property
    def busy_share(self) -> float:
        return self.busy / max(self.total, 1)

    @property
    def steal_share(self) -> float:
        return self.steal / max(self.total, 1)
