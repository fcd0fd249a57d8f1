"""The machine's load at measurement time, to be stored beside every CPU benchmark row.

A CPU timing means little without the load it was taken under: on a 2-core machine, two other
busy processes make every multi-threaded op several times slower, and not every op by the same
factor (benchmarks/README.md, "CPU figures under load"). `describe_load()` samples what the
kernel reports (Linux `/proc`; elsewhere only what `os` offers) over a short window.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

__all__ = ["describe_load"]

# environment variables that decide how many threads the intra-op pool uses and how its
# threads wait at a barrier (spinning threads burn a core that a competitor wants)
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
               "KMP_BLOCKTIME", "OMP_PROC_BIND")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpu_jiffies() -> Optional[tuple[int, int]]:
    """(busy, total) jiffies summed over all CPUs, from /proc/stat."""
    text = _read("/proc/stat")
    if not text or not text.startswith("cpu "):
        return None
    fields = [int(v) for v in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def _proc_jiffies(pid: str) -> Optional[tuple[str, int]]:
    """(command name, utime + stime jiffies) of one process, all its threads."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # the command name is in parentheses and may itself contain spaces or parentheses
    lp, rp = text.find("("), text.rfind(")")
    rest = text[rp + 2:].split()
    try:
        return text[lp + 1:rp], int(rest[11]) + int(rest[12])
    except (IndexError, ValueError):
        return None


def _all_procs() -> dict[str, tuple[str, int]]:
    out = {}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        v = _proc_jiffies(pid)
        if v is not None:
            out[pid] = v
    return out


def _cpu_model() -> Optional[str]:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _thread_settings() -> dict[str, Any]:
    out: dict[str, Any] = {k: os.environ.get(k) for k in _THREAD_ENV}
    torch = sys.modules.get("torch")  # never import torch just to describe the machine
    if torch is not None:
        out["torch_num_threads"] = torch.get_num_threads()
        out["torch_num_interop_threads"] = torch.get_num_interop_threads()
    return out


def describe_load(window_s: float = 0.5, top: int = 3) -> dict[str, Any]:
    """The machine's load now: a dict of JSON-serialisable values.

    Keys: `cpu_model`, `cpus` (logical CPUs), `cpus_usable` (this process's affinity),
    `loadavg_1m` / `_5m` / `_15m`, `runnable` (runnable tasks right now, from /proc/loadavg),
    `busy_cores` (all processes, in cores, averaged over `window_s`), `other_busy_cores`
    (the same without this process), `other_busy_fraction` (`other_busy_cores / cpus`),
    `top_other` (up to `top` other processes as [pid, command, cores] over the window),
    `window_s`, and `threads` (the intra-op thread count and the OpenMP/MKL environment).
    The window is spent sleeping, so this process adds nothing to what it measures; pass
    `window_s=0` to skip the sampling (the busy figures are then None). Values the platform
    does not offer are None.
    """
    cpus = os.cpu_count()
    try:
        usable: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cpus
    try:
        l1, l5, l15 = os.getloadavg()
    except (AttributeError, OSError):
        l1 = l5 = l15 = None
    runnable = None
    la = _read("/proc/loadavg")
    if la:
        try:
            runnable = int(la.split()[3].split("/")[0])
        except (IndexError, ValueError):
            runnable = None
    busy = other = frac = None
    top_other: Optional[list] = None
    c0 = _cpu_jiffies() if window_s > 0 else None
    if c0 is not None:
        me = str(os.getpid())
        p0 = _all_procs() if top > 0 else {}
        s0 = _proc_jiffies(me)
        t0 = time.monotonic()
        time.sleep(window_s)
        c1, s1 = _cpu_jiffies(), _proc_jiffies(me)
        p1 = _all_procs() if top > 0 else {}
        elapsed = time.monotonic() - t0
        if c1 is not None and c1[1] > c0[1]:
            ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            span = c1[1] - c0[1]  # jiffies over all CPUs
            ncpu = cpus or 1
            busy = (c1[0] - c0[0]) / span * ncpu
            mine = (s1[1] - s0[1]) / (ticks * elapsed) if s0 and s1 else 0.0
            other = max(busy - mine, 0.0)
            frac = other / ncpu
            if top > 0:
                used = []
                for pid, (name, j1) in p1.items():
                    if pid == me or pid not in p0:
                        continue
                    d = (j1 - p0[pid][1]) / (ticks * elapsed)
                    if d > 0.01:
                        used.append([int(pid), name, round(d, 3)])
                top_other = sorted(used, key=lambda v: -v[2])[:top]
    return {
        "cpu_model": _cpu_model(),
        "cpus": cpus,
        "cpus_usable": usable,
        "loadavg_1m": l1,
        "loadavg_5m": l5,
        "loadavg_15m": l15,
        "runnable": runnable,
        "busy_cores": None if busy is None else round(busy, 3),
        "other_busy_cores": None if other is None else round(other, 3),
        "other_busy_fraction": None if frac is None else round(frac, 3),
        "top_other": top_other,
        "window_s": window_s,
        "threads": _thread_settings(),
    }
