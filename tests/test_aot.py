"""The ahead-of-time compile check (`llm_adapters.triton_kernels.aot`) and the shared-memory
model the autotuned kernels prune with.

The enumeration runs in a subprocess without TRITON_INTERPRET (conftest turns it on here, and
the interpreter selects its own one-config lists): it calls the launchers on meta tensors and
asks each kernel's prune function for its configs on sm_80 and sm_90. The model is held against
the compiler on a handful of configs (a few seconds of compile each, CPU only).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few configs per kernel family: the model must bound what the compiler allocates, and not
# by more than 3x (it counts num_stages buffers for every pipelined loop; sm_80 keeps one
# fewer and sometimes reuses the K loop's buffers for the epilogue).
_MODEL_CASES = [
    # kernel, dtype, r, config index (into the kernel's config list), cc
    ("lora._main_kernel", "bf16", 64, 0, 90),
    ("lora._dx_kernel", "fp16", 64, 1, 80),
    ("lora._shrink_kernel", "fp32", 256, 0, 80),
    ("series._series_forward_kernel", "bf16", 512, 5, 90),
]


def _run(script: str, timeout: int = 600) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def enumeration() -> dict:
    """Per launch variant and target: kernel, dtype, constexprs, the launchable configs with
    the model's bytes, and the AUTOTUNE=0 config with its bytes."""
    return _run(
        """
        import json
        from llm_adapters.triton_kernels import aot
        vs = aot.enumerate_launches()
        rows, _ = aot.plan(vs, "ci")
        out = []
        for r in rows:
            v = vs[r["variant"]]
            out.append({
                "kernel": v["kernel"], "dtype": aot._dtype_of(v), "cc": r["cc"],
                "constexprs": dict(v["constexprs"]), "example": v["example"],
                "launchable": {c: r["model"][c] for c in r["launchable"]},
                "untuned": r["untuned"], "untuned_bytes": r["model"][r["untuned"]],
            })
        print(json.dumps({"rows": out, "targets": aot.TARGETS, "kernels": list(aot.KERNELS)}))
        """
    )


def test_enumeration_covers_every_kernel_dtype_and_option(enumeration):
    rows = enumeration["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == set(enumeration["kernels"])
    for kernel in kernels - {"dropout._keep_mask_kernel"}:
        dtypes = {r["dtype"] for r in rows if r["kernel"] == kernel}
        assert dtypes == {"bf16", "fp16", "fp32"}, (kernel, dtypes)
    main = [r["constexprs"] for r in rows if r["kernel"] == "lora._main_kernel"]
    assert {c["ACT"] for c in main} == {0, 1, 2, 3, 4}
    assert {(c["HAS_BIAS"], c["HAS_BB"], c["HAS_SCALE_T"]) for c in main} >= {
        (False, False, False), (True, True, True)
    }
    for kernel in ("lora._main_kernel", "lora._dx_kernel"):  # lora_linear, and lora_add's
        assert {r["constexprs"]["HAS_BASE"] for r in rows if r["kernel"] == kernel} == {
            True, False}
    # DoRA: the column scale with and without the saved T, over W and over y0 (dora_add)
    # (lora_add has no base bias: HAS_BIAS without HAS_BASE is DoRA's epilogue bias only)
    assert {(c["COL_SCALE"], c["SAVE_T"], c["HAS_BASE"], c["HAS_BIAS"]) for c in main} >= {
        (s, t, base, bias) for s, t in ((False, False), (True, False), (True, True))
        for base in (True, False) for bias in (True, False) if s or base or not bias}
    dx = [r["constexprs"] for r in rows if r["kernel"] == "lora._dx_kernel"]
    assert {(c["COL_SCALE"], c["HAS_BASE"], c["DROPOUT"]) for c in dx} == {
        (s, base, d) for s in (True, False) for base in (True, False) for d in (True, False)
        if not (s and not base)}  # dora_add's dx does not read g: no column scale there
    fwd = [r["constexprs"] for r in rows if r["kernel"] == "series._series_forward_kernel"]
    assert {c["HAS_DROPOUT"] for c in fwd} == {False, True}
    assert {c["ONE_R_TILE"] for c in fwd} == {False, True}
    assert {c["IEEE"] for c in fwd} == {False, True}
    assert {r["cc"] for r in rows} == {80, 90}


def test_every_variant_keeps_a_config_that_fits(enumeration):
    limits = {int(k): v for k, v in enumeration["targets"].items()}
    bad = [
        (r["kernel"], r["cc"], r["example"])
        for r in enumeration["rows"]
        if r["launchable"] and min(
            (b for b in r["launchable"].values() if b is not None), default=0
        ) > limits[r["cc"]]
    ]
    assert not bad, bad[:5]
    over = [
        (r["kernel"], r["cc"], c, b)
        for r in enumeration["rows"]
        for c, b in r["launchable"].items()
        if b is not None and b > limits[r["cc"]]
    ]
    assert not over, over[:5]


def test_untuned_config_fits_both_targets_for_every_variant(enumeration):
    limits = {int(k): v for k, v in enumeration["targets"].items()}
    rows = enumeration["rows"]
    by_variant: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kernel"], r["example"], json.dumps(r["constexprs"], sort_keys=True))
        by_variant.setdefault(key, {})[r["cc"]] = r
        if r["untuned_bytes"] is not None:
            assert r["untuned_bytes"] <= min(limits.values()), (r["kernel"], r["example"])
    for key, per_cc in by_variant.items():
        # the same config on an A100 and an H100: AUTOTUNE=0 runs are comparable across them
        assert per_cc[80]["untuned"] == per_cc[90]["untuned"], key


def test_smem_model_bounds_the_compiled_kernels():
    cases = json.dumps(_MODEL_CASES)
    out = _run(
        f"""
        import json
        from llm_adapters.triton_kernels import aot
        grid = {{"KN": (4096,), "M": (512,), "r": sorted({{c[2] for c in {cases}}})}}
        vs = aot.enumerate_launches(grid)
        res = []
        for kernel, dtype, r, index, cc in {cases}:
            cands = [v for v in vs if v["kernel"] == kernel and aot._dtype_of(v) == dtype
                     and dict(v["signature"]) and f" r={{r}} " in v["example"]]
            v = cands[0]
            cfg = aot.KERNELS[kernel][2]()[index]
            got = aot.compile_job(aot._job(v, cfg, cc))
            res.append([kernel, cc, got.get("error"), got.get("shared"),
                        aot.smem_model(v, cfg, cc)])
        print(json.dumps(res))
        """
    )
    for kernel, cc, error, shared, model in out:
        assert error is None, (kernel, error)
        assert shared <= model, (kernel, cc, shared, model)
        assert model <= 3 * shared, (kernel, cc, shared, model)


_SYNTHETIC = {
    "kernel": "lora._main_kernel", "signature": (("x_ptr", "*bf16"),), "constexprs": (),
    "divisible": (), "count": 1, "example": "synthetic",
}


def _job_of(cc, cid):
    return {"synthetic": cc, "config": cid}


def _synthetic(monkeypatch, configs=("cfg",)):
    """Point aot's check at one synthetic variant whose `configs` are launchable on each target
    (the first is AUTOTUNE=0's, 1000 B in the model); the compile of (cc, config) has the job
    _job_of(cc, config). Returns the aot module."""
    from llm_adapters.triton_kernels import aot

    def fake_plan(variants, subset):
        rows = [
            {"variant": 0, "cc": cc, "launchable": list(configs), "untuned": configs[0],
             "model": {c: 1000 for c in configs}, "_cfgs": {}}
            for cc in aot.TARGETS
        ]
        return rows, [(0, cc, c, _job_of(cc, c)) for cc in aot.TARGETS for c in configs]

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot.lora, "_INTERPRET", False)
    monkeypatch.setattr(aot.series, "_INTERPRET", False)
    monkeypatch.setattr(aot, "enumerate_launches", lambda grid=None, jobs=1: [_SYNTHETIC])
    monkeypatch.setattr(aot, "plan", fake_plan)
    return aot


def test_exit_status_on_a_synthetic_overflow(monkeypatch, tmp_path):
    aot = _synthetic(monkeypatch)

    def results(shared):
        def fake_run(jobs, n_jobs, cache, log=print, cached_only=False):
            return [
                {"error": None, "shared": shared, "regs": 64, "stack": 0, "local": 0,
                 "mma": True, "wgmma": True, "compile_s": 0.0, "cached": False}
                for _ in jobs
            ]
        return fake_run

    monkeypatch.setattr(aot, "run_jobs", results(900))
    assert aot.main(["--out", str(tmp_path / "ok"), "--cache", "none"]) == 0
    # over the A100's limit (and over the model): a launchable config that cannot launch
    monkeypatch.setattr(aot, "run_jobs", results(200_000))
    assert aot.main(["--out", str(tmp_path / "bad"), "--cache", "none"]) == 1
    report = json.loads((tmp_path / "bad" / "aot.json").read_text())
    assert any("over shared memory" in f for f in report["failures"])
    assert any("model too low" in f for f in report["failures"])


def test_cached_only_reports_what_the_cache_holds(monkeypatch, tmp_path):
    """--cached-only compiles nothing: cached results are checked as usual, the others are
    counted pending and their fit checks use the model."""
    aot = _synthetic(monkeypatch)
    jobs = {cc: _job_of(cc, "cfg") for cc in aot.TARGETS}

    def never(*_):
        raise AssertionError("--cached-only must not compile")

    monkeypatch.setattr(aot, "compile_job", never)
    cache = tmp_path / "cache"
    cache.mkdir()
    first = min(aot.TARGETS)

    def cached(shared):
        res = {"error": None, "shared": shared, "regs": 64, "stack": 0, "local": 0,
               "mma": True, "wgmma": True, "compile_s": 1.0}
        (cache / f"{aot._job_hash(jobs[first])}.json").write_text(json.dumps(res))

    cached(900)
    out = tmp_path / "ok"
    assert aot.main(["--full", "--cached-only", "--cache", str(cache), "--out", str(out)]) == 0
    report = json.loads((out / "aot.json").read_text())
    assert report["meta"]["pending"] == 1 and report["meta"]["cached"] == 1
    assert report["figures"]["pending"] == 1
    assert "Partial: 1 of 2 compiles done, 1 pending" in (out / "aot.md").read_text()
    # a cached result over the limit still fails the check
    cached(200_000)
    assert aot.main(["--full", "--cached-only", "--cache", str(cache), "--out", str(out)]) == 1
    with pytest.raises(SystemExit):
        aot.main(["--cached-only", "--cache", "none", "--out", str(out)])


def test_refuses_to_run_under_the_interpreter(monkeypatch, tmp_path):
    from llm_adapters.triton_kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--out", str(tmp_path)]) == 2


def test_seed_carries_results_of_an_earlier_report(monkeypatch, tmp_path):
    """--seed puts an earlier report's compile results into the cache under their job hashes;
    entries with an error, pending ones and ones whose job is unknown are not seeded, so a
    second run reports them from the cache as the first run did."""
    import gzip

    aot = _synthetic(monkeypatch)
    jobs = {cc: _job_of(cc, "cfg") for cc in aot.TARGETS}

    def never(*_):
        raise AssertionError("a seeded run must not compile")

    monkeypatch.setattr(aot, "compile_job", never)
    first, second = sorted(aot.TARGETS)
    good = {"error": None, "shared": 900, "regs": 64, "stack": 0, "local": 0,
            "mma": True, "wgmma": True, "compile_s": 1.0}
    report = {"compiles": [
        {"variant": 0, "cc": first, "config": "cfg", "job": aot._job_hash(jobs[first]),
         "cached": False, **good},
        {"variant": 0, "cc": second, "config": "cfg", "job": aot._job_hash(jobs[second]),
         "cached": False, **{**good, "error": "CompilationError: x"}},
        {"variant": 0, "cc": second, "config": "cfg", "job": "0" * 32, "pending": True},
    ]}
    seed = tmp_path / "aot.json.gz"
    with gzip.open(seed, "wt") as f:
        json.dump(report, f)
    cache = tmp_path / "cache"
    assert aot.seed_cache([seed], cache) == 1
    assert json.loads((cache / f"{aot._job_hash(jobs[first])}.json").read_text()) == good
    assert aot.seed_cache([seed], cache) == 0  # already there
    out = tmp_path / "out"
    assert aot.main(["--full", "--cached-only", "--seed", str(seed), "--cache", str(cache),
                     "--out", str(out)]) == 0
    written = json.loads((out / "aot.json").read_text())
    assert written["meta"]["cached"] == 1 and written["meta"]["pending"] == 1
    by_cc = {c["cc"]: c for c in written["compiles"]}
    assert by_cc[first]["job"] == aot._job_hash(jobs[first]) and by_cc[first]["shared"] == 900
    # the written report seeds a fresh cache in turn
    assert aot.seed_cache([out / "aot.json"], tmp_path / "cache2") == 1
    with pytest.raises(SystemExit):
        aot.main(["--seed", str(seed), "--cache", "none", "--out", str(out)])


def test_a_result_cached_by_another_process_is_not_compiled_again(monkeypatch, tmp_path):
    """run_jobs looks at the cache again just before each compile: a result another process
    wrote since the run started is taken (marked cached) and not rewritten."""
    from llm_adapters.triton_kernels import aot

    jobs = [{"synthetic": 1}, {"synthetic": 2}]
    cache = tmp_path / "cache"
    cache.mkdir()
    res = {"error": None, "shared": 1, "regs": 1, "stack": 0, "local": 0, "mma": True,
           "wgmma": False, "compile_s": 0.5}
    compiled = []

    def fake_compile(job):
        compiled.append(job)
        # the other process finishes job 2 while this one compiles job 1
        (cache / f"{aot._job_hash(jobs[1])}.json").write_text(json.dumps(res))
        return {**res, "shared": 2}

    monkeypatch.setattr(aot, "compile_job", fake_compile)
    out = aot.run_jobs(jobs, 1, cache, log=lambda *_: None)
    assert compiled == [jobs[0]]
    assert out[0]["shared"] == 2 and out[0]["cached"] is False
    assert out[1]["shared"] == 1 and out[1]["cached"] is True
    assert json.loads((cache / f"{aot._job_hash(jobs[0])}.json").read_text())["shared"] == 2


def test_an_avoidable_heavy_spill_fails_the_check(monkeypatch, tmp_path):
    """Two launchable configs of one variant: one spilling 2 KB per thread while the other
    spills nothing fails the check (the pruning should have dropped it); when both spill, the
    spill is reported but not a failure (nothing better could launch)."""
    aot = _synthetic(monkeypatch, configs=("a", "b"))

    def results(stack_b):
        def fake_run(jobs, n_jobs, cache, log=print, cached_only=False):
            return [
                {"error": None, "shared": 900, "regs": 255, "local": 0, "mma": True,
                 "wgmma": True, "compile_s": 0.0, "cached": False,
                 "stack": 2048 if job["config"] == "a" else stack_b}
                for job in jobs
            ]
        return fake_run

    monkeypatch.setattr(aot, "run_jobs", results(0))
    assert aot.main(["--out", str(tmp_path / "bad"), "--cache", "none"]) == 1
    report = json.loads((tmp_path / "bad" / "aot.json").read_text())
    assert report["figures"]["heavy_spill_avoidable"] == len(aot.TARGETS)
    assert all("heavy spill" in f for f in report["failures"])
    monkeypatch.setattr(aot, "run_jobs", results(512))
    assert aot.main(["--out", str(tmp_path / "ok"), "--cache", "none"]) == 0
    report = json.loads((tmp_path / "ok" / "aot.json").read_text())
    assert report["figures"]["spilling"] == 2 * len(aot.TARGETS)
