"""The mixed-adapter and DoRA benchmarks run and compare ours with PEFT before they time
anything; their JSON holds the machine and the load."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mixed.py"


def _module(name="bench_mixed"):
    spec = importlib.util.spec_from_file_location(name, _PATH.with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_bench_mixed_small_case(kind):
    row = _module().run_case(kind, 8, 3, 3, 24, 4, "cpu", torch.float32, rounds=1)
    assert row["rows"] == (8 if kind == "decode" else 24) and row["adapters"] == 3
    assert row["max_abs_diff"] <= 1e-5 and row["ours_ms"] > 0 and row["peft_ms"] > 0


def test_bench_mixed_json_has_machine_and_load(tmp_path):
    out = tmp_path / "mixed.json"
    assert _module().main(["--kn", "24", "--r", "4", "--sequences", "4", "--prefill-tokens", "2",
                           "--adapters", "2", "--rounds", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and data["meta"]["torch"] == torch.__version__
    assert "load" in data["meta"] and "load_after" in data["meta"]


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_bench_dora_small_case(mode):
    row = _module("bench_dora").run_case(mode, 9, 24, 4, "cpu", torch.float32, rounds=1)
    assert row["mode"] == mode and row["tokens"] == 9
    assert row["max_abs_diff"] <= 1e-5 and row["ours_ms"] > 0 and row["peft_ms"] > 0
