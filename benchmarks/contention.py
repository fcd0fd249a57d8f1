"""Series adapter fwd+bwd on CPU, ours (torch backend) vs LLM-Adapters' eager formulation,
with the cores free and with busy single-threaded competitor processes on them.

    python benchmarks/contention.py                       # M 1024 and 4096, 0 and 2 competitors
    python benchmarks/contention.py --competitors 0 2 --rounds 40 --json out.json
    setsid python benchmarks/contention.py --nice -20    # as root on a shared machine
    LD_PRELOAD=/tmp/libgomp_regions.so python benchmarks/contention.py --regions  # see there

Each condition starts its competitors (`while True` loops in Python, each stopping by itself
after `--max-seconds` and killed when the condition ends), samples the machine's load
(`llm_adapters.bench.load.describe_load`), then times the two providers in turns, one
forward+backward each per round, order rotated every round, so any other load on a shared
machine falls on both alike. It reports medians of wall time, the ratio of the medians
(eager / ours: above 1 means ours is faster) and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from llm_adapters import ops
from llm_adapters.bench.load import describe_load

_SPIN = "import time\nend = time.monotonic() + {t}\nwhile time.monotonic() < end:\n    pass\n"


def _tensors(m: int, n: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + seed)
    return {
        "h": torch.randn(m, n, generator=gen).requires_grad_(True),
        "down": torch.randn(r, n, generator=gen).mul_(n**-0.5).requires_grad_(True),
        "up": torch.randn(n, r, generator=gen).mul_(r**-0.5).requires_grad_(True),
        "g": torch.randn(m, n, generator=gen),
    }


def eager(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LLM-Adapters' bottleneck adapter (bench/series.py `eager`), tanh, scaling 1, no dropout."""
    h = t["h"]
    return h + F.linear(torch.tanh(F.linear(h, t["down"])), t["up"]) * 1.0


def ours(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return ops.series_adapter(t["h"], t["down"], t["up"], scaling=1.0, activation="tanh",
                              backend="torch")


PROVIDERS = {"eager": eager, "ours": ours}


def _step(fn, t) -> tuple[float, float]:
    for k in ("h", "down", "up"):
        t[k].grad = None
    c0, t0 = time.process_time(), time.perf_counter()
    fn(t).backward(t["g"])
    t1, c1 = time.perf_counter(), time.process_time()
    return (t1 - t0) * 1e3, (c1 - c0) * 1e3


def time_case(m: int, n: int, r: int, rounds: int, warmup: int) -> dict:
    sets = [_tensors(m, n, r, s) for s in range(2)]
    names = list(PROVIDERS)  # eager first: speedups are eager / each other provider
    for name in names:
        for i in range(warmup):
            _step(PROVIDERS[name], sets[i % 2])
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for i in range(rounds):
        shift = i % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            w, c = _step(PROVIDERS[name], sets[i % 2])
            wall[name].append(w)
            cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    out = {
        "tokens": m, "hidden": n, "rank": r, "rounds": rounds,
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "cpu_ms": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "speedup": {}, "speedup_paired_median": {}, "speedup_paired_iqr": {},
        "wall_ms": {k: [round(v, 3) for v in vs] for k, vs in wall.items()},
    }
    for k in names:
        if k == "eager":
            continue
        paired = [e / o for e, o in zip(wall["eager"], wall[k])]
        out["speedup"][k] = round(med["eager"] / med[k], 3)
        out["speedup_paired_median"][k] = round(statistics.median(paired), 3)
        out["speedup_paired_iqr"][k] = [round(q, 3) for q in statistics.quantiles(paired, n=4)[::2]]
    return out


def count_regions(tokens, n, r) -> dict:
    """OpenMP parallel regions per forward+backward of each provider, read from the counter of
    benchmarks/gomp_regions.c when it is preloaded (LD_PRELOAD); {} otherwise."""
    import ctypes

    try:
        counter = ctypes.CDLL(None).gomp_regions
    except AttributeError:
        return {}
    counter.restype = ctypes.c_long
    out = {}
    for m in tokens:
        t = _tensors(m, n, r, 0)
        for name, fn in PROVIDERS.items():
            _step(fn, t)
            c0 = counter()
            _step(fn, t)
            out[f"{name} M={m}"] = counter() - c0
    return out


def run_condition(competitors: int, tokens, n, r, rounds, warmup, max_seconds) -> dict:
    procs = []
    try:
        for _ in range(competitors):
            procs.append(subprocess.Popen([sys.executable, "-c", _SPIN.format(t=max_seconds)]))
        if procs:
            time.sleep(0.3)  # let the competitors get onto the cores
        before = describe_load(window_s=0.5)
        cases = [time_case(m, n, r, rounds, warmup) for m in tokens]
        after = describe_load(window_s=0.5)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return {"competitors": competitors, "nice": _niceness(), "load_before": before,
            "load_after": after, "cases": cases}


def _renice(inc: int) -> None:
    os.nice(inc)
    # With scheduler autogroups (Linux, on by default), niceness only ranks processes within
    # one session's group, and each group gets an equal share; so set the group's niceness too
    # (run under `setsid` so that the group is this run alone).
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(os.nice(0)))
    except OSError:
        pass


def _niceness() -> str:
    try:
        with open("/proc/self/autogroup") as f:
            group = f.read().split()[-1]
    except (OSError, IndexError):
        group = "?"
    return f"{os.nice(0)} (autogroup {group})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=120.0,
                    help="each competitor stops by itself after this long")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--nice", type=int, default=0,
                    help="add this to the niceness first (competitors inherit it); e.g. -20 as "
                         "root: the machine's other (nice 0) load then barely takes CPU from "
                         "the run, which approximates free cores on a shared machine")
    ap.add_argument("--regions", action="store_true",
                    help="only count OpenMP regions per call (needs benchmarks/gomp_regions.c "
                         "preloaded; see there)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.nice:
        _renice(args.nice)
    if args.regions:
        counts = count_regions(args.tokens, args.hidden, args.rank)
        if not counts:
            raise SystemExit("no region counter: preload benchmarks/gomp_regions.c (see there)")
        for k, v in counts.items():
            print(f"{k}: {v} OpenMP regions per forward+backward")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for c in args.competitors:
        res = run_condition(c, args.tokens, args.hidden, args.rank, args.rounds, args.warmup,
                            args.max_seconds)
        results.append(res)
        lb = res["load_before"]
        print(f"competitors={c}  nice={res['nice']}  load1m={lb['loadavg_1m']:.2f}  "
              f"other_busy_cores={lb['other_busy_cores']}  "
              f"threads={lb['threads'].get('torch_num_threads')}  "
              f"top={lb['top_other']}")
        for cs in res["cases"]:
            times = "  ".join(f"{k} {v:7.2f}" for k, v in cs["median_ms"].items())
            sp = "  ".join(f"{k} {v:.2f}x (paired {cs['speedup_paired_median'][k]:.2f}x, "
                           f"iqr {cs['speedup_paired_iqr'][k]})" for k, v in cs["speedup"].items())
            print(f"  M={cs['tokens']:5d}  ms: {times}   eager/ours: {sp}")
        print(f"  after: other_busy_cores={res['load_after']['other_busy_cores']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": describe_load(0)["cpu_model"], "torch": torch.__version__,
                       "command": " ".join(sys.argv), "env": {k: os.environ.get(k) for k in (
                           "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")},
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
