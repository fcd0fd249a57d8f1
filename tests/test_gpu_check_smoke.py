"""`benchmarks/gpu_check.sh --cpu-smoke`: the one GPU command, run end to end on a CPU at tiny
sizes, so that a change anywhere in what it calls cannot break it unnoticed before a GPU run.

It checks the script and the commands it runs (their flags, files and exit statuses), not the
GPU code. The kernels part needs the CUDA extension's host build; where that is not built or
cached already (CI builds it before the tests, csrc/build_check.sh), it is left out, with the
reason, rather than compiled here for minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from llm_adapters.ops import cuda_backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ("check", "tests", "kernels", "ops", "tune", "e2e", "qlora", "mixed", "dora")


def _summary(stdout: str) -> dict[str, str]:
    """part -> status from the summary table the script prints last (the rows right after
    its `part status secs log` header)."""
    lines = stdout.split("== summary", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["part", "status"])
    table = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or cells[0] not in PARTS:
            break
        table[cells[0]] = cells[1]
    return table


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path, monkeypatch):
    env = dict(os.environ)
    # as a user runs it, not as the tests do (conftest: interpreter on, backend torch); the
    # self-check turns the interpreter on for itself, the tests part through conftest
    for name in ("LLM_ADAPTERS_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    env.setdefault("LLM_ADAPTERS_CUDA_ARCHS", "9.0")  # the arch CI's build check compiles
    monkeypatch.setenv("LLM_ADAPTERS_CUDA_ARCHS", env["LLM_ADAPTERS_CUDA_ARCHS"])
    skip = []
    if not cuda_backend.ready_without_compile():
        skip.append("kernels")
        print("kernels part left out: the CUDA extension is not built or cached here "
              f"({cuda_backend.extension_status()[1]})")
    env["SKIP_PARTS"] = " ".join(skip)
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]
    status = _summary(proc.stdout)
    assert set(status) == set(PARTS), text[-3000:]
    for part in PARTS:
        assert status[part] == ("skipped" if part in skip else "ok"), text[-3000:]
    assert (out / "status").read_text().strip() == "0"
    assert "torch:" in (out / "environment.txt").read_text()
    # the self-check ran first and its full table is kept in the results folder
    assert proc.stdout.index("== check:") < proc.stdout.index("== tests:")
    log = (out / "check.log").read_text()
    assert "max rel err" in log and "0 failed, 0 errors" in log
    report = json.loads((out / "check.json").read_text())
    assert report["status"] == 0 and any(r["status"] == "pass" for r in report["rows"])
    assert "self-check: " in proc.stdout
    # the tests part collected the GPU tests (skipped without a GPU), the benchmarks wrote rows
    assert (out / "pytest-gpu.xml").is_file()
    assert list(out.glob("*.jsonl")), sorted(p.name for p in out.iterdir())
    assert (out / "backend_table.json").is_file()
    for name in ("bench-mixed.json", "bench-dora.json"):  # ours vs PEFT, rows written
        assert json.loads((out / name).read_text())["rows"], name


def test_gpu_plan_fits_eight_minutes(tmp_path):
    """The GPU plan (--dry-run prints it without running it): the self-check first, and the
    part budgets leaving at least 30 s of the 8 minutes for the environment record and the
    summary."""
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("part budgets: "))
    budget = int(line.split()[2])
    assert budget <= 8 * 60 - 30, line
    plan = [x.split(":")[0][3:] for x in proc.stdout.splitlines() if x.startswith("== ")]
    assert plan[: len(PARTS)] == list(PARTS)
    assert "llm_adapters.cli check --device cuda" in proc.stdout
