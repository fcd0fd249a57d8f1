"""`auto`'s measured choice between backends (llm_adapters/ops/_choice.py).

On a GPU the candidates are the Triton and CUDA kernels; here the same machinery runs with the
CPU registered as a measured device type, where the candidates are the torch backend and the
Triton interpreter. No test depends on which one is faster: timings on a shared machine vary.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_adapters import ops
from llm_adapters.ops import _choice

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache folder, no remembered choices, auto on, CPU treated like a GPU."""
    monkeypatch.setenv("LLM_ADAPTERS_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "1")
    monkeypatch.delenv("LLM_ADAPTERS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_choice, "_MEASURED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(_choice, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(ops, "_resolved", {})
    _choice.reset()
    yield tmp_path
    _choice.reset()


def _key(m=40, k=24, n=20, r=4, dropout=False, op="lora", dtype=torch.float32):
    return _choice.shape_key(op, dtype, m, k, n, r, dropout)


def _write_table(path, device, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ("op", "dtype", "m", "k", "n", "r", "dropout")
    data = {"format": _choice.FORMAT, "device": device,
            "rows": [{**dict(zip(fields, key)), "ms": ms} for key, ms in rows]}
    path.write_text(json.dumps(data))


def test_shape_key_buckets_rows_like_the_triton_autotuner():
    assert [_choice.m_bucket(m) for m in (1, 16, 17, 32, 33, 1000, 1024, 1025)] == [
        16, 16, 32, 32, 64, 1024, 1024, 2048]
    assert _key(m=600) == ("lora", "float32", 1024, 24, 20, 4, False)
    assert _key(op="series", dtype=torch.bfloat16, dropout=True)[:2] == (
        "series", "bfloat16")


def test_measures_once_picks_the_faster_and_remembers_across_processes(fresh):
    calls = []

    def fake_measure(key, m, backends, device):
        calls.append((key, m, tuple(backends)))
        return {"triton": 2.0, "torch": 3.0} if key[2] == 64 else {"triton": 5.0, "torch": 1.0}

    key_a, key_b = _key(m=40), _key(m=1000)
    assert _choice.choose(key_a, 40, ["triton", "torch"], CPU, fake_measure) == "triton"
    assert _choice.choose(key_b, 1000, ["triton", "torch"], CPU, fake_measure) == "torch"
    assert _choice.choose(_key(m=50), 50, ["triton", "torch"], CPU, fake_measure) == "triton"
    assert [c[:2] for c in calls] == [(key_a, 40), (key_b, 1000)]  # m=50 is m=40's bucket

    saved = json.loads(_choice.user_table_path("cpu").read_text())
    assert saved["device"] == "cpu" and saved["format"] == _choice.FORMAT
    assert {(r["m"], tuple(sorted(r["ms"]))) for r in saved["rows"]} == {
        (64, ("torch", "triton")), (1024, ("torch", "triton"))}

    _choice.reset()  # a new process: the table is read back, nothing is measured again

    def must_not_measure(*args):
        raise AssertionError("measured a shape the table already has")

    assert _choice.choose(key_a, 40, ["triton", "torch"], CPU, must_not_measure) == "triton"
    assert _choice.choose(key_b, 1000, ["triton", "torch"], CPU, must_not_measure) == "torch"


def test_a_new_candidate_is_measured_even_when_the_shape_has_a_row(fresh):
    _write_table(_choice.user_table_path("cpu"), "cpu", [(_key(), {"torch": 1.0})])
    seen = []

    def fake_measure(key, m, backends, device):
        seen.append(tuple(backends))
        return {"torch": 1.0, "triton": 0.5}

    assert _choice.choose(_key(), 40, ["triton", "torch"], CPU, fake_measure) == "triton"
    assert seen == [("triton", "torch")]


def test_without_measuring_the_nearest_row_of_this_device_decides(fresh, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "0")
    _write_table(fresh / "shipped" / "cpu.json", "cpu", [
        (_key(m=128, k=4096, n=4096, r=16), {"triton": 1.0, "torch": 2.0}),
        (_key(m=8192, k=4096, n=4096, r=16), {"triton": 9.0, "torch": 4.0}),
        (_key(m=8192, k=4096, n=4096, r=16, op="series"), {"triton": 1.0, "torch": 4.0}),
    ])
    _write_table(fresh / "shipped" / "other.json", "another GPU", [
        (_key(m=256, k=4096, n=4096, r=16), {"triton": 9.0, "torch": 1.0}),
    ])

    def must_not_measure(*args):
        raise AssertionError("measured with LLM_ADAPTERS_AUTO_MEASURE=0")

    def pick(m, **kw):
        return _choice.choose(_key(m=m, k=4096, n=4096, r=16, **kw), m, ["triton", "torch"],
                              CPU, must_not_measure)

    assert pick(200) == "triton"  # 256: nearest to 128 (the other device's row is not read)
    assert pick(16384) == "torch"
    assert pick(16384, dropout=True) == "torch"  # same shape, other flag: still the nearest
    assert pick(16384, op="series") == "triton"


def test_nothing_measured_falls_back_to_the_fixed_order(fresh, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "0")
    assert _choice.choose(_key(), 40, ["torch", "triton"], CPU) == "triton"
    assert _choice.choose(_key(), 40, ["torch"], CPU) == "torch"


def test_a_broken_table_is_ignored_not_fatal(fresh, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "0")
    path = _choice.user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    (fresh / "shipped").mkdir()
    (fresh / "shipped" / "cpu.json").write_text(json.dumps(
        {"format": _choice.FORMAT, "device": "cpu",
         "rows": [{"op": "lora", "dtype": "float32", "m": 64}]}))  # a row missing fields
    assert _choice.choose(_key(), 40, ["torch", "triton"], CPU) == "triton"


def test_a_backend_that_fails_to_run_is_not_chosen(fresh, monkeypatch):
    def fake_time(key, m, backend, device, repeats=5, warmup=2):
        if backend == "triton":
            raise RuntimeError("cannot compile this shape")
        return 3.0

    monkeypatch.setattr(_choice, "time_backend", fake_time)
    with pytest.warns(RuntimeWarning, match="backend 'triton' failed .* cannot compile"):
        assert _choice.measure(_key(), 40, ["triton", "torch"], CPU) == {"torch": 3.0}
    with pytest.warns(RuntimeWarning):
        assert _choice.choose(_key(), 40, ["triton", "torch"], CPU) == "torch"


def test_auto_measures_real_backends_per_shape_without_touching_the_rng(fresh, monkeypatch):
    """End to end through ops.lora_linear / series_adapter: the first call at a shape times the
    torch backend against the Triton interpreter, picks the faster, writes both timings, and
    gives the same result as an explicit backend."""
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "1")
    x = torch.randn(5, 7, 24, requires_grad=True)
    w = torch.randn(20, 24)
    a = torch.randn(4, 24, requires_grad=True)
    b = torch.randn(20, 4, requires_grad=True)
    state = torch.get_rng_state()
    y = ops.lora_linear(x, w, None, a, b, scaling=2.0)
    assert torch.equal(torch.get_rng_state(), state)

    h = torch.randn(9, 24, requires_grad=True)
    z = ops.series_adapter(h, torch.randn(3, 24), torch.randn(24, 3))
    assert z.shape == h.shape

    rows = json.loads(_choice.user_table_path("cpu").read_text())["rows"]
    assert {(r["op"], r["m"], r["k"], r["n"], r["r"]) for r in rows} == {
        ("lora", 64, 24, 20, 4), ("series", 16, 24, 24, 3)}
    for row in rows:
        assert set(row["ms"]) == {"torch", "triton"}
        assert all(t > 0 for t in row["ms"].values())
    # the choice is the faster of the two as measured (which one that is, is not asserted:
    # tests never depend on timings)
    lora_ms = next(r["ms"] for r in rows if r["op"] == "lora")
    chosen = ops._backend("lora", x.reshape(-1, 24), None, 20, 4, 0.0).name
    assert chosen == min(lora_ms, key=lora_ms.get)
    ref = ops.lora_linear(x, w, None, a, b, scaling=2.0, backend=chosen)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_eager_choice_follows_the_shape(fresh, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "0")
    _write_table(_choice.user_table_path("cpu"), "cpu", [
        (_key(m=16, k=24, n=20, r=4), {"triton": 1.0, "torch": 2.0}),
        (_key(m=4096, k=24, n=20, r=4), {"triton": 3.0, "torch": 2.0}),
    ])
    small, big = torch.randn(9, 24), torch.randn(3000, 24)
    with torch.no_grad():
        assert ops._backend("lora", small, None, 20, 4, 0.0).name == "triton"
    assert ops._backend("lora", big, None, 20, 4, 0.0).name == "torch"
    assert ops._backend("lora", small, "torch", 20, 4, 0.0).name == "torch"  # keyword wins
    monkeypatch.setenv("LLM_ADAPTERS_BACKEND", "torch")
    assert ops._backend("lora", small, None, 20, 4, 0.0).name == "torch"


def test_compiled_callers_use_the_table_without_measuring(fresh, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_AUTO_MEASURE", "1")
    _write_table(_choice.user_table_path("cpu"), "cpu", [
        (_key(m=16, k=24, n=20, r=4), {"triton": 5.0, "torch": 1.0}),
    ])

    def must_not_measure(*args, **kw):
        raise AssertionError("measured while tracing")

    monkeypatch.setattr(_choice, "measure", must_not_measure)
    x, w = torch.randn(9, 24), torch.randn(20, 24)
    a, b = torch.randn(4, 24), torch.randn(20, 4)
    f = torch.compile(lambda x: ops.lora_linear(x, w, None, a, b, scaling=0.5), fullgraph=True)
    with torch.no_grad():
        y = f(x)
    torch.testing.assert_close(y, ops.lora_linear(x, w, None, a, b, 0.5, backend="torch"))
    memo = ("cpu", _key(m=9, k=24, n=20, r=4), ("triton", "torch"))
    assert _choice._choices[memo] == "torch"


def test_tune_backends_command_writes_a_table_auto_reads(fresh, capsys):
    from llm_adapters.bench import tune

    out = fresh / "table.json"
    rc = tune.main(["--device", "cpu", "--op", "lora", "--tokens", "20", "--hidden", "24",
                    "--rank", "4", "--dropout", "0", "--repeats", "2", "--backends", "torch",
                    "triton", "cuda", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "leaving out backend 'cuda'" in text
    shipped = json.loads(out.read_text())
    ms = shipped["rows"][0]["ms"]
    faster = min(ms, key=ms.get)
    assert text.splitlines()[-3].split()[-2:] == [faster, "-"]  # the row: winner, no cuda
    assert shipped["device"] == "cpu"
    assert [(r["op"], r["m"], set(r["ms"])) for r in shipped["rows"]] == [
        ("lora", 32, {"torch", "triton"})]
    # the user's table got the row too, and auto takes it without measuring
    user = json.loads(_choice.user_table_path("cpu").read_text())
    assert user["rows"] == shipped["rows"]

    def must_not_measure(*args):
        raise AssertionError("measured a tuned shape")

    assert _choice.choose(_key(m=20, k=24, n=24), 20, ["triton", "torch"], CPU,
                          must_not_measure) == faster


def test_saving_keeps_rows_another_process_wrote(fresh):
    """Two processes measure different shapes at once; each save keeps the other's rows."""
    mine = _choice.table_for("cpu")
    other = _choice.Table("cpu")
    other.add(_key(m=16), {"torch": 1.0, "triton": 2.0}, user=True)
    _choice.save_user_table(other)
    mine.add(_key(m=4096), {"torch": 3.0, "triton": 1.0}, user=True)
    mine.add(_key(m=16), {"torch": 5.0, "triton": 1.0}, user=True)  # measured here: kept
    _choice.save_user_table(mine)
    rows = json.loads(_choice.user_table_path("cpu").read_text())["rows"]
    assert {(r["m"], r["ms"]["torch"]) for r in rows} == {(16, 5.0), (4096, 3.0)}
    other.add(_key(m=256), {"torch": 1.0}, user=True)
    _choice.save_user_table(other)
    rows = json.loads(_choice.user_table_path("cpu").read_text())["rows"]
    assert {(r["m"], r["ms"]["torch"]) for r in rows} == {(16, 1.0), (256, 1.0), (4096, 3.0)}


@pytest.mark.parametrize("reentrant", [False, True])
def test_measuring_inside_activation_checkpointing_leaves_it_intact(fresh, reentrant):
    """The first call at a shape may come inside a checkpointed forward (saved-tensor hooks
    active, or grad mode off) or its recomputation in backward: measuring there must neither
    disturb the checkpoint nor inherit its state."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(6, 24, requires_grad=True)
    w = torch.randn(20, 24)
    a = torch.randn(4, 24, requires_grad=True)
    b = torch.randn(20, 4, requires_grad=True)

    def f(x):
        return ops.lora_linear(x, w, None, a, b, scaling=2.0, dropout_p=0.1, seed=9)

    def grads_of(y, g):
        for t in (x, a, b):
            t.grad = None
        y.backward(g)  # (reentrant checkpointing does not support autograd.grad)
        return [t.grad.clone() for t in (x, a, b)]

    y = checkpoint(f, x, use_reentrant=reentrant)
    g = torch.randn_like(y)
    grads = grads_of(y, g)
    # one measurement for forward (grad mode off under reentrant checkpointing) and
    # recomputation: one key, one backend for both
    (row,) = json.loads(_choice.user_table_path("cpu").read_text())["rows"]
    assert set(row["ms"]) == {"torch", "triton"}
    chosen = min(row["ms"], key=row["ms"].get)
    key = _key(m=6, k=24, n=20, r=4, dropout=True)
    assert _choice._choices[("cpu", key, ("triton", "torch"))] == chosen
    ref_y = ops.lora_linear(x, w, None, a, b, 2.0, 0.1, seed=9, backend=chosen)
    ref = grads_of(ref_y, g)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
