"""Timing of benchmark calls: interleaved providers, CUDA events or the process clocks.

On a GPU each call is timed with CUDA events (read after one synchronisation, so timing does
not serialise the launch queue); on a CPU with `time.perf_counter`, and the process CPU time
beside it (steadier than wall time on a shared machine). Rows report the median and the 20th
and 80th percentiles (`quantiles`). `StepClock` times whole training steps the same way for
the end-to-end benchmark.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from .harness import Runner


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(20th percentile, median, 80th percentile), linear interpolation between samples."""
    if not times:
        raise ValueError("no timings")
    t = torch.tensor(sorted(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Times one call of `mode` on a runner: CUDA events on a GPU, perf_counter on a CPU.

    Samples are kept as event pairs on a GPU and read after one synchronisation, so timing
    does not serialise the launch queue.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.cuda = mode, device.type == "cuda"

    def __call__(self, runner: Runner, record: list) -> None:
        runner.zero_grad()
        if self.mode == "forward":
            fn: Callable[[], Any] = runner.forward
        elif self.mode == "backward":
            out = runner.forward()  # untimed: only the backward is measured
            fn = lambda: out.backward(runner.out_grad)  # noqa: E731
        else:
            fn = lambda: runner.forward().backward(runner.out_grad)  # noqa: E731
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            record.append((start, end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            record.append(((t1 - t0) * 1e3, (c1 - c0) * 1e3))

    def read(self, record: list) -> list[float]:
        """Milliseconds per sample (event time on a GPU, wall time on a CPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in record]
        return [wall for wall, _ in record]

    def read_cpu(self, record: list) -> Optional[list[float]]:
        """CPU time of this process per sample (all its threads), on a CPU device only."""
        return None if self.cuda else [cpu for _, cpu in record]


def time_interleaved(
    runners: dict[str, Sequence[Runner]],
    mode: str,
    device: torch.device,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    cpu_times: Optional[dict[str, list[float]]] = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of `mode` for each provider, one sample per call.

    Each provider gets `warmup` untimed calls, then the providers take turns, one call each
    per round, in an order rotated every round, each call on the next of its input sets. Taking
    turns spreads any background load (a shared CPU, clock changes) evenly over the providers
    instead of charging it to whichever ran at the wrong moment. The number of rounds is what
    fits `budget_s` per provider (estimated from the warm-up), within [min_reps, max_reps].
    In "backward" mode the forward of each call runs untimed first. On a CPU, `cpu_times` (when
    given) is filled with the process CPU time of each call: unlike wall time it does not grow
    when other processes take the cores, so it is the steadier number on a shared machine.
    """
    timer = _Timer(mode, device)
    names = list(runners)
    per_call = {}
    for name in names:
        warm: list = []
        _sync(device)
        t0 = time.perf_counter()
        for i in range(max(warmup, 1)):
            timer(runners[name][i % len(runners[name])], warm)
        _sync(device)
        wall = (time.perf_counter() - t0) / max(warmup, 1)
        # the slower of event and wall time: wall includes the untimed setup of each call
        per_call[name] = max(timer.read(warm)[-1], wall * 1e3, 1e-3) / 1e3
    slowest = max(per_call.values()) if per_call else 1.0
    reps = int(min(max(budget_s / slowest, min_reps), max_reps))
    records: dict[str, list] = {name: [] for name in names}
    for i in range(reps):
        shift = i % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            timer(runners[name][i % len(runners[name])], records[name])
    if cpu_times is not None:
        for name in names:
            cpu_times[name] = timer.read_cpu(records[name]) or []
    return {name: timer.read(records[name]) for name in names}


def time_runners(
    runners: Sequence[Runner],
    mode: str,
    device: torch.device,
    warmup: int = 1,
    min_reps: int = 5,
    max_reps: int = 50,
    budget_s: float = 1.0,
) -> list[float]:
    """Milliseconds per call of `mode` for one provider, rotating among its input sets."""
    times = time_interleaved({"_": runners}, mode, device, warmup, min_reps, max_reps, budget_s)
    return times["_"]



@dataclass
class Budget:
    """How long to time each row: warm-up calls, sample count bounds, seconds of samples."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    seconds: float = 1.0
    sets: int = 2  # input sets rotated among

    @staticmethod
    def for_device(device: torch.device, quick: bool = False) -> Budget:
        if quick:
            return Budget(warmup=2, min_reps=3, max_reps=5, seconds=0.02, sets=2)
        if device.type == "cuda":
            # the warm-up absorbs Triton autotuning and cuBLAS heuristics
            return Budget(warmup=5, min_reps=10, max_reps=200, seconds=0.4, sets=4)
        return Budget(warmup=1, min_reps=5, max_reps=30, seconds=1.0, sets=2)



class StepClock:
    """Wall and process CPU milliseconds of a block, synchronising a GPU at both ends.

        clock = StepClock(device)
        with clock:
            step()
        clock.wall_ms, clock.cpu_ms
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall_ms = self.cpu_ms = 0.0

    def __enter__(self) -> StepClock:
        _sync(self.device)
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        _sync(self.device)
        t1, c1 = time.perf_counter(), time.process_time()
        self.wall_ms, self.cpu_ms = (t1 - self._t0) * 1e3, (c1 - self._c0) * 1e3


def medians_in_turns(fns: dict[str, Callable[[], Any]], device: str,
                     rounds: int) -> dict[str, float]:
    """Median wall seconds of each callable, after one warm-up call each: called in turns, the
    order rotated every round, so load on a shared machine falls on all of them alike (the
    A/B scripts under benchmarks/). A CUDA device is synchronised around every call."""
    dev = torch.device(device)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for i in range(rounds):
        shift = i % len(order)
        for k in order[shift:] + order[:shift]:
            _sync(dev)
            t0 = time.perf_counter()
            fns[k]()
            _sync(dev)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
