"""Launching a test file as a torchrun job: N CPU processes with gloo, as users launch training.

A test module that runs under torchrun is also the worker script: its `if __name__ ==
"__main__":` calls its worker, which reads the rank and world size from the environment torchrun
sets (`torch.distributed.init_process_group("gloo")`) and leaves what it measured under the
folder it is given. One launch per module (a module fixture): starting the processes and
importing torch and transformers in them costs more than the scenarios they run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_torchrun(script: str, out: Path, nproc: int = 2, timeout: int = 600) -> float:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node <nproc> script out`
    on the torch backend with one thread per process; fail the test with the end of its output
    unless every process exited with 0. Returns the seconds the launch took."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), script, str(out)]
    env = dict(os.environ, LLM_ADAPTERS_BACKEND="torch", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return seconds


def close_process_group() -> None:
    """End a worker's gloo group (call it in the worker's `finally`): a barrier, so that every
    rank is done, then destroy_process_group. A rank that tears its side down while another
    still talks to it can abort in gloo's threads ("terminate called without an active
    exception") after its work is done. While an exception propagates there is no barrier (the
    other ranks may never reach it): that rank fails at once, and torchrun stops the rest."""
    import torch.distributed as dist

    try:
        if sys.exc_info()[0] is None:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def write_report(out: str, rank: int, report: dict) -> None:
    """Leave a worker's measurements for the test: `report-<rank>.json` in `out`."""
    with open(os.path.join(out, f"report-{rank}.json"), "w") as f:
        json.dump(report, f)


def read_reports(out: Path, nproc: int = 2) -> list[dict]:
    """The `report-<rank>.json` of every rank, rank 0 first."""
    reports = []
    for rank in range(nproc):
        with open(Path(out) / f"report-{rank}.json") as f:
            reports.append(json.load(f))
    return reports
