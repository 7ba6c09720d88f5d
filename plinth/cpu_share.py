"""Sharing the CPU with other processes: how many threads plinth's model work uses while they run.

PyTorch's OpenMP threads spin-wait for each other between kernels. Alone on the machine that is
the fastest way to run; but when another process keeps a core busy, every kernel waits for a
thread the operating system has put aside, and both jobs slow down several times over, far more
than twofold (benchmarks/sharing.py). So while other processes use more than half a core of the
cores this process may run on, the model runs on one thread fewer for each such core, and when
they stop it takes the cores back. The thread count does not change results: the kernels plinth
runs give the same bits on one thread as on two (tests/test_cpu_share.py checks a model's).

The busy time of those cores comes from /proc/stat and this process's own from its CPU clock;
the rest is the other processes'. Without /proc/stat (not Linux) the thread count stays as set.

    share = CpuShare(most=2)     # on the thread that runs the model:
    share.adjust()               # between steps; sets torch's thread count for this thread
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
# /proc/stat's columns after the name: user nice system idle iowait irq softirq steal ...; idle and
# iowait are the ones that are not busy.
NOT_BUSY = (3, 4)


def usable_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def busy_seconds(cpus: set[int], stat: Path = PROC_STAT) -> float | None:
    """Seconds the given CPUs have spent busy since boot, all processes together; None where the
    system does not say."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks += sum(int(v) for i, v in enumerate(fields[:8]) if i not in NOT_BUSY)
    return ticks / os.sysconf("SC_CLK_TCK")


def threads_for(others: float, cores: int, most: int) -> int:
    """Threads to run with when other processes use `others` cores of `cores`: one fewer for each
    core they use more than half of, never fewer than one nor more than `most`."""
    return max(1, min(most, cores - max(0, math.ceil(others - 0.5))))


class CpuShare:
    """Watches what other processes use of this process's cores and sets the calling thread's
    torch thread count to leave them room (see the module's doc). `every`: seconds per measured
    window; a new count needs two windows in a row that ask for it, so a moment's load from
    elsewhere does not move it."""

    def __init__(self, most: int, every: float = 1.0, busy=None, own=time.process_time, clock=time.monotonic):
        self.most, self.threads, self.every = most, most, every
        cpus = usable_cpus()
        self.cores = len(cpus)
        self._busy = busy or (lambda: busy_seconds(cpus))
        self._own, self._clock = own, clock
        self._last: tuple[float, float, float] | None = None  # clock, busy, own at the window's start
        self._asked = most

    def adjust(self) -> int:
        """Call between steps, on the thread that runs the model (torch's thread count is that
        thread's own); returns the thread count now in force."""
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.every:
            return self.threads
        busy, own = self._busy(), self._own()
        if busy is None:
            return self.threads
        if self._last is not None:
            then, busy_then, own_then = self._last
            others = ((busy - busy_then) - (own - own_then)) / (now - then)
            asked = threads_for(others, self.cores, self.most)
            if asked != self.threads and asked == self._asked:
                self.threads = asked
                torch.set_num_threads(asked)
            self._asked = asked
        self._last = (now, busy, own)
        return self.threads
