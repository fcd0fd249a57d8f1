"""llm_adapters.bench.load: the machine-load record stored beside CPU benchmark rows."""

import json
import os
import sys

import pytest
import torch  # noqa: F401  (describe_load reports thread settings once torch is loaded)

from llm_adapters.bench.load import describe_load

KEYS = {"cpu_model", "cpus", "cpus_usable", "loadavg_1m", "loadavg_5m", "loadavg_15m",
        "runnable", "busy_cores", "other_busy_cores", "other_busy_fraction", "top_other",
        "window_s", "threads"}


def test_keys_and_json():
    d = describe_load(window_s=0.05)
    assert set(d) == KEYS
    json.dumps(d)  # stored in results rows as is
    assert d["cpus"] == os.cpu_count()
    assert d["threads"]["torch_num_threads"] >= 1  # torch is imported by the test session
    assert "OMP_WAIT_POLICY" in d["threads"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_busy_figures_are_in_range():
    d = describe_load(window_s=0.1)
    assert 0.0 <= d["other_busy_cores"] <= d["busy_cores"] + 1e-9 <= d["cpus"] + 0.05
    assert 0.0 <= d["other_busy_fraction"] <= 1.05
    assert d["loadavg_1m"] >= 0.0
    for pid, name, cores in d["top_other"]:
        assert pid != os.getpid() and isinstance(name, str) and cores > 0


def test_no_window_skips_sampling():
    d = describe_load(window_s=0)
    assert d["busy_cores"] is None and d["other_busy_cores"] is None and d["top_other"] is None
