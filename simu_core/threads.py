"""CPU thread budget: how many torch intra-op threads a run (or each parallel sweep point) gets.

torch's default is one intra-op thread per core, each OpenMP thread spinning while it waits for the
others at every op. That is right for one process alone on a machine and badly wrong otherwise:
fine-tuning the default target took 0.13 s per step alone on 2 cores but 5-8 s per step beside one
other torch process (issue 11), far beyond a fair share, because every op waits for a thread whose
core is taken. So:

- points of a sweep that run at once share the cores: ``threads per point = free cores / points``
  (:func:`threads_for`), set in each point's own thread (torch's thread count is per thread);
- the free cores are the process's cores minus those other processes keep busy right now
  (:func:`busy_cores`, sampled from ``/proc/stat``), so a run on a shared machine starts with the
  threads it can actually have;
- OpenMP waits passively (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose otherwise, so a thread
  waiting for a partner whose core is taken sleeps instead of burning a core.

:func:`configure_threads` applies this to a process (the ``simu`` command calls it first).

``benchmarks/threads.py`` measures these options; the figures are in the README.
"""

from __future__ import annotations

import math
import os
import sys
import time

__all__ = ["available_cores", "busy_cores", "configure_threads", "set_torch_threads", "threads_for"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat`` (None where it cannot be read)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def busy_cores(interval: float = 0.25) -> float:
    """How many cores other processes keep busy now (measured over ``interval`` seconds).

    Sampled from ``/proc/stat`` while this process sleeps; falls back to the 1-minute load average
    where ``/proc/stat`` is missing, and to 0 where neither exists.
    """
    cores = os.cpu_count() or 1
    first = _cpu_times()
    if first is not None:
        time.sleep(interval)
        second = _cpu_times()
        if second is not None and second[1] > first[1]:
            return cores * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def threads_for(parallel: int = 1, cores: int | None = None, busy: float | None = None) -> int:
    """Torch threads for each of ``parallel`` concurrent runs: the free cores shared out, at least 1.

    Args:
        parallel: runs (sweep points) computing at the same time in this process.
        cores: cores this process may use (default: :func:`available_cores`).
        busy: cores other processes keep busy (default: measured by :func:`busy_cores`); a core
            counts as taken from half its time on.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    cores = available_cores() if cores is None else cores
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    busy = busy_cores() if busy is None else busy
    free = cores - math.floor(max(0.0, busy) + 0.5)
    return max(1, free // parallel)


def set_torch_threads(threads: int) -> None:
    """Set torch's intra-op threads for the calling thread (and threads that start later)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def configure_threads(threads: int | None = None) -> int:
    """Choose this process's torch thread budget and apply it; returns it.

    ``threads`` given: that many. Otherwise ``OMP_NUM_THREADS`` where the user set it, else the
    cores other processes leave free (:func:`threads_for`); once torch is loaded (a host program
    that configured it), never more than its current setting. OpenMP is asked to wait passively
    unless ``OMP_WAIT_POLICY`` is set. Before torch is loaded, both go to the environment, which is
    what its OpenMP runtime reads; afterwards the count goes to ``torch.set_num_threads``.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    loaded = "torch" in sys.modules
    if threads is None:
        chosen = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(chosen) if chosen.isdigit() and int(chosen) > 0 else threads_for(1)
        if loaded:
            threads = min(threads, sys.modules["torch"].get_num_threads())
    if loaded:
        set_torch_threads(threads)
    else:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads
