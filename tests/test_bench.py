"""The benchmark harness: parity catches wrong results, timings are sane, results round-trip,
and `llm-adapters bench --quick` runs (in-process and as the installed console script)."""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llm_adapters import ops
from llm_adapters.bench import harness, lora, memory, parity, results, series, timing
from llm_adapters.bench.harness import Case
from llm_adapters.bench.timing import Budget

QUICK = Budget(warmup=1, min_reps=3, max_reps=4, seconds=0.01, sets=2)


def _lora_case(**kw) -> Case:
    base = dict(op="lora", mode="full", tokens=37, k=24, n=40, rank=5)
    base.update(kw)
    return Case(**base)


def _series_case(**kw) -> Case:
    base = dict(op="series", mode="full", tokens=37, k=40, n=40, rank=6, activation="tanh",
                scaling=1.0)
    base.update(kw)
    return Case(**base)


# -- providers that are fast and wrong -----------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class _WrongOutRunner(lora._EagerRunner):
    def forward(self):
        return super().forward() * 1.001  # 0.1 % off: far above fp32 rounding


class _WrongGradRunner(lora._EagerRunner):
    def forward(self):
        t = dict(self.t)
        t["lora_a"] = _ScaleGrad.apply(self.t["lora_a"], 1.5)  # right output, wrong dA
        saved, self.t = self.t, t
        try:
            return super().forward()
        finally:
            self.t = saved


class _NoBranchRunner(lora._EagerRunner):
    def forward(self):  # "fast": skips the adapter branch entirely
        y = F.linear(self.t["x"], self.t["weight"])
        return y + 0.0 * (self.t["lora_a"].sum() + self.t["lora_b"].sum())


class _WrongMaskRunner(lora._OursRunner):
    def keep_mask(self):  # reports a mask other than the one its forward used
        mask, scale = super().keep_mask()
        return torch.roll(mask, 1, dims=1), scale


def _provider(name, runner_cls, base=lora.Eager):
    class P(base):
        def build(self, case, tensors):
            if issubclass(runner_cls, lora._OursRunner):
                return runner_cls(case, tensors, "torch")
            return runner_cls(case, tensors)

    p = P() if base is not lora.Ours else P("torch")
    p.name = name
    return p


def _rows_by_provider(rows):
    return {r.provider: r for r in rows}


def test_wrong_results_fail_parity():
    wrong = [
        _provider("wrong-out", _WrongOutRunner),
        _provider("wrong-grad", _WrongGradRunner),
        _provider("no-branch", _NoBranchRunner),
    ]
    rows = harness.run_cases(
        lora.SPEC, [_lora_case()], [lora.Eager(), lora.Ours("torch"), *wrong], QUICK
    )
    by = _rows_by_provider(rows)
    assert by["eager"].parity == "pass"
    assert by["ours-torch"].parity == "pass"
    for name in ("wrong-out", "wrong-grad", "no-branch"):
        assert by[name].status == "ok"
        assert by[name].parity == "FAIL", (name, by[name].parity_errors, by[name].parity_tol)
    # the failing tensor is named: the output for a wrong forward, dA for a wrong backward
    bad = by["wrong-grad"]
    assert bad.parity_errors["out"] <= bad.parity_tol["out"]
    assert bad.parity_errors["d_lora_a"] > bad.parity_tol["d_lora_a"]
    assert "FAIL (d_lora_a" in results.format_table(rows)


def test_dropout_parity_uses_each_providers_mask():
    case = _lora_case(dropout=0.3)
    provs = [lora.Eager(), lora.Peft(), lora.Ours("torch"),
             _provider("wrong-mask", _WrongMaskRunner, base=lora.Ours)]
    by = _rows_by_provider(harness.run_cases(lora.SPEC, [case], provs, QUICK))
    for name in ("eager", "peft", "ours-torch"):
        assert by[name].parity == "pass", (name, by[name].parity_errors)
    assert by["wrong-mask"].parity == "FAIL"


def test_parity_tolerance_cannot_be_loosened_by_a_broken_baseline():
    errors = {"out": 0.3}
    ok, tol = parity.parity_verdict(errors, {"out": 0.4}, torch.float32)
    assert not ok and tol["out"] < 1e-3
    ok, _ = parity.parity_verdict({"out": 1e-7}, {"out": 1e-7}, torch.float32)
    assert ok
    ok, _ = parity.parity_verdict({"out": math.inf}, {"out": 1e-7}, torch.float32)
    assert not ok


@pytest.mark.parametrize("mode", harness.MODES)
def test_timings_positive_and_quantiles_ordered(mode):
    case = _series_case(mode=mode, dropout=0.1)
    rows = harness.run_cases(series.SPEC, [case], series.providers(("torch",)), QUICK)
    ok = [r for r in rows if r.status == "ok"]
    assert {r.provider for r in ok} == {"eager", "adapterhub", "ours-torch"}
    for r in ok:
        assert r.reps >= QUICK.min_reps
        assert 0 < r.p20_ms <= r.time_ms <= r.p80_ms
        assert r.tflops > 0 and r.gbps > 0 and r.mem_bytes > 0
    by = _rows_by_provider(rows)
    assert by["ours-torch"].parity == "pass" and by["eager"].parity == "pass"
    assert by["adapterhub"].parity == "n/a"  # dropout on its output: another function


def test_quantiles_and_time_runners():
    assert timing.quantiles([3.0, 1.0, 2.0, 5.0, 4.0]) == pytest.approx((1.8, 3.0, 4.2))
    case = _lora_case(mode="backward", x_grad=False)
    sets = [lora.make_tensors(case, s) for s in range(2)]
    runners = [lora.Ours("torch").build(case, t) for t in sets]
    times = timing.time_runners(runners, "backward", torch.device("cpu"), 1, 4, 4, 0.0)
    assert len(times) == 4 and all(t > 0 for t in times)


def test_saved_bytes_counts_what_backward_keeps():
    # eager LoRA with dropout keeps a float copy of the dropped x; ours keeps a bool mask
    case = _lora_case(tokens=64, k=32, n=32, rank=4, dropout=0.2)
    t = lora.make_tensors(case, 0)
    eager, _ = memory.saved_bytes(lora.Eager().build(case, t))
    ours, out = memory.saved_bytes(lora.Ours("torch").build(case, t))
    assert out == 64 * 32 * 4
    assert eager >= 64 * 32 * 4  # the dropped copy of x, float32
    assert ours < eager


def test_counts():
    c = _lora_case(mode="forward", tokens=10, k=20, n=30, rank=4)
    assert lora.lora_flops(c) == 2 * 10 * 30 * 20 + 2 * 10 * 20 * 4 + 2 * 10 * 30 * 4
    full = lora.lora_flops(_lora_case(mode="full", tokens=10, k=20, n=30, rank=4))
    bwd = lora.lora_flops(_lora_case(mode="backward", tokens=10, k=20, n=30, rank=4))
    assert full == lora.lora_flops(c) + bwd
    s = _series_case(mode="forward", tokens=10, k=30, n=30, rank=4)
    assert series.series_min_bytes(s) == 2 * 10 * 30 * 4 + 2 * 30 * 4 * 4


def test_results_round_trip(tmp_path):
    rows = harness.run_cases(lora.SPEC, [_lora_case()], [lora.Eager(), lora.Gemm()], QUICK)
    env = results.environment(torch.device("cpu"))
    records = [r.to_dict(env) for r in rows]
    records[0]["weird"] = math.inf  # non-finite floats are written as null
    path = tmp_path / "res" / "cpu.jsonl"
    results.append_results(str(path), records)
    results.append_results(str(path), records[:1])
    back = results.read_results(str(path))
    assert len(back) == len(records) + 1
    assert back[0]["weird"] is None
    for rec, got in zip(records, back, strict=False):
        for key in ("device_name", "device", "torch", "transformers", "git_commit", "date", "op",
                    "mode", "tokens", "k", "n", "rank", "dtype", "dropout", "x_grad", "provider"):
            assert key in got
            assert got[key] == rec[key]
        assert got["time_ms"] == pytest.approx(rec["time_ms"])
        assert got["parity_errors"] == pytest.approx(rec["parity_errors"])
        _check_load(got["load"])


def _check_load(load):
    """Every row carries the machine's load where bench.load can describe it, else None."""
    if importlib.util.find_spec("llm_adapters.bench.load") is None:
        assert load is None
    else:
        assert isinstance(load, dict) and load["cpus"] == os.cpu_count(), load


def test_case_validation():
    with pytest.raises(ValueError, match="mode"):
        _lora_case(mode="sideways")
    with pytest.raises(ValueError, match="dtype"):
        _lora_case(dtype="int8")
    with pytest.raises(ValueError, match="k .* must equal n"):
        series.make_tensors(_series_case(k=12), 0)


def test_triton_provider_under_the_interpreter():
    why = lora.backend_skip_reason("lora", "triton", "cpu", allow_interpreter=True)
    if why is not None:
        pytest.skip(why)
    case = _lora_case(tokens=19, k=24, n=40, rank=5, dropout=0.25)
    rows = harness.run_cases(lora.SPEC, [case], [lora.Eager(), lora.Ours("triton", True)],
                             Budget(warmup=1, min_reps=1, max_reps=1, seconds=0.0, sets=1))
    by = _rows_by_provider(rows)
    assert by["ours-triton"].parity == "pass", by["ours-triton"].parity_errors
    # not allowed: skipped with the reason
    assert "interpreter" in lora.Ours("triton").skip_reason(case)


def _check_outputs(out_dir):
    files = os.listdir(out_dir)
    jsonl = [f for f in files if f.endswith(".jsonl")]
    assert len(jsonl) == 1, files
    recs = results.read_results(os.path.join(out_dir, jsonl[0]))
    assert recs and all(r["status"] in ("ok", "skipped") for r in recs)
    assert all(r["parity"] in ("pass", "n/a", None) for r in recs)
    assert {r["op"] for r in recs} == {"lora", "series"}
    return files


def test_cli_quick_in_process(tmp_path, capsys):
    from llm_adapters.cli import main

    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    files = _check_outputs(tmp_path)
    assert any(f.endswith(".png") for f in files)
    printed = capsys.readouterr().out
    assert "vs peft" in printed and "ours-torch" in printed
    assert ops.backend_status("torch") is None


def test_cli_quick_console_script(tmp_path):
    exe = shutil.which("llm-adapters") or os.path.join(os.path.dirname(sys.executable),
                                                       "llm-adapters")
    if not os.path.exists(exe):
        pytest.skip("the llm-adapters console script is not installed")
    proc = subprocess.run(
        [exe, "bench", "--quick", "--no-plot", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity" in proc.stdout
    _check_outputs(tmp_path)


def test_table_roofline_and_summary(tmp_path):
    from llm_adapters.bench import summary

    rows = harness.run_cases(lora.SPEC, [_lora_case(mode="forward")],
                             [lora.Eager(), lora.Gemm(), lora.Ours("torch")], QUICK)
    for r in rows:  # as on a GPU with a known roofline
        r.peak_tflops, r.peak_tbps = 1e-3, 1e-3
    table = results.format_table(rows)
    assert "roof%" in table
    frac = results.roofline_fraction(rows[0])
    assert frac == pytest.approx(max(rows[0].tflops / 1e-3, rows[0].gbps / 1.0))
    env = results.environment(torch.device("cpu"))
    results.append_results(str(tmp_path / "dev.jsonl"), [r.to_dict(env) for r in rows])
    (tmp_path / "pytest-gpu.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    lines: list[str] = []
    assert summary.summarise(str(tmp_path), lines.append) == 1  # the failed test counts
    text = "\n".join(lines)
    assert "2 passed, 1 failed, 0 errors, 2 skipped" in text
    assert "ours-torch" in text and "parity failures or errors: 0" in text
    (tmp_path / "pytest-gpu.xml").write_text('<testsuite tests="3" failures="0" skipped="3"/>')
    assert summary.summarise(str(tmp_path), lines.append) == 0


def test_e2e_pairs_start_equal_and_train_alike():
    from llm_adapters.bench import e2e

    cfg = e2e.E2EConfig.for_device(torch.device("cpu"), quick=True)
    cfg.steps, cfg.warmup = 2, 1
    results = e2e.run_e2e(cfg, torch.device("cpu"), log=lambda s: None)
    assert [(r.variant, r.impl) for r in results] == [
        ("lora", "ours"), ("lora", "peft"), ("series", "ours"), ("series", "eager"),
        ("parallel", "ours"), ("parallel", "eager"),
    ]
    for r in results:
        assert r.status == "ok", r.reason
        assert len(r.losses) == 3 and r.tokens_per_s > 0 and r.saved_bytes > 0
        assert r.trainable > 0 and r.trainable < r.params
        _check_load(r.load)
        # same function, same start, same batches: fp32 losses agree to rounding
        assert r.loss_max_abs_diff < 1e-4, (r.variant, r.loss_max_abs_diff)
    # the adapters do train: the loss moves
    assert all(r.losses[-1] != r.losses[0] for r in results)
    ours, peft = results[0], results[1]
    assert ours.trainable == peft.trainable
    assert "max|dloss|" in e2e.format_table(results, cfg)


def test_e2e_qlora_pair_on_the_same_4bit_base():
    pytest.importorskip("bitsandbytes")
    import llm_adapters as la
    from llm_adapters.bench import e2e

    cfg = e2e.E2EConfig.for_device(torch.device("cpu"), quick=True)
    cfg.steps, cfg.warmup = 2, 1
    base = e2e.build_model(cfg, torch.device("cpu"))
    ours, theirs = e2e._pair_models(e2e.QLORA, base, cfg)
    # ours wraps 4-bit layers, PEFT its bnb layer; both hold the packed weights, not floats
    assert {type(m.base_layer).__name__ for m in ours.modules()
            if isinstance(m, la.LoraLinear)} == {"Linear4bit"}
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in theirs.modules())
    assert e2e.resident_bytes(ours) == e2e.resident_bytes(theirs) < e2e.resident_bytes(base)
    del ours, theirs
    pair = e2e.run_e2e(cfg, torch.device("cpu"), variants=(e2e.QLORA,), log=lambda s: None)
    assert [(r.variant, r.impl, r.status) for r in pair] == [
        ("qlora", "ours", "ok"), ("qlora", "peft", "ok")]
    assert pair[0].loss_max_abs_diff < 1e-4 and pair[0].speedup > 0
    assert pair[0].weights_bytes == pair[1].weights_bytes and pair[0].trainable > 0
    recs = e2e.to_records(pair, cfg, results.environment(torch.device("cpu")))
    assert recs[0]["variant"] == "qlora" and recs[0]["weights_bytes"] > 0


# -- GPU (run with `pytest -m gpu`) ----------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bench_quick(tmp_path):
    from llm_adapters.cli import main

    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 0
    recs = results.read_results(os.path.join(tmp_path, os.listdir(tmp_path)[0]))
    ok = [r for r in recs if r["status"] == "ok"]
    assert ok and all(r["mem_kind"] == "cuda_peak_allocated" for r in ok)
    assert all(r["peak_bytes"] is not None and r["time_ms"] > 0 for r in ok)
    assert "ours-triton" in {r["provider"] for r in ok}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op", ["lora", "series"])
def test_gpu_parity_at_llama_width(op, dtype):
    spec = lora.SPEC if op == "lora" else series.SPEC
    kw = dict(activation="tanh", scaling=1.0) if op == "series" else {}
    case = Case(op=op, mode="full", tokens=1003, k=4096, n=4096, rank=16, dtype=dtype,
                dropout=0.05, device="cuda", **kw)
    provs = (lora if op == "lora" else series).providers(("triton", "cuda"))
    rows = harness.run_cases(spec, [case], provs, Budget(warmup=2, min_reps=3, max_reps=3,
                                                         seconds=0.0, sets=2))
    by = _rows_by_provider(rows)
    assert by["ours-triton"].parity == "pass", by["ours-triton"].parity_errors
    if by["ours-cuda"].status == "ok":
        assert by["ours-cuda"].parity == "pass", by["ours-cuda"].parity_errors
    assert all(r.status != "error" for r in rows), [(r.provider, r.reason) for r in rows]


def test_summary_reads_a_backend_table(tmp_path):
    from llm_adapters.bench import summary

    rows = [
        {"op": "lora", "dtype": "bfloat16", "m": m, "k": 4096, "n": 4096, "r": 16,
         "dropout": False, "grad": True, "ms": {"triton": 1.0, "cuda": c, "torch": 3.0}}
        for m, c in ((256, 0.9), (1024, 1.1), (16384, 2.0))
    ]
    (tmp_path / "backend_table.json").write_text(
        __import__("json").dumps({"format": 1, "device": "GPU X", "rows": rows}))
    lines: list[str] = []
    assert summary.summarise(str(tmp_path), printer=lines.append) == 0
    text = "\n".join(lines)
    assert "backend table (backend_table.json, GPU X): 3 shapes" in text
    assert [ln.split()[6:] for ln in lines[2:5]] == [["cuda", "0.90"], ["triton", "1.10"],
                                                      ["triton", "2.00"]]
    assert lines[-1] == ("cuda vs triton at M <= 1024: worst time ratio 1.10 (target <= 1.00) "
                         "MISSED")
