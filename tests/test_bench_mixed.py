"""The mixed-adapter benchmark runs and compares ours with PEFT before it times anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_mixed", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bench_mixed_small_case(kind):
    row = _module().run_case(kind, 8, 3, 3, 24, 4, "cpu", torch.float32, rounds=1)
    assert row["rows"] == (8 if kind == "decode" else 24) and row["adapters"] == 3
    assert row["max_abs_diff"] <= 1e-5 and row["ours_ms"] > 0 and row["peft_ms"] > 0
