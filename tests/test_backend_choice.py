"""`auto`'s fixed rule (llm_adapters/ops/_dispatch.py), the measured tables it reads
(ops/_choice.py) and `llm-adapters tune-backends`, the one thing that writes them.

There is no GPU here: the GPU rule is exercised by treating the CPU as a GPU (`_on_gpu`), with
the Triton interpreter as the triton backend and, where the cuda backend must take part, a
stand-in that runs the Triton kernels under the name "cuda" (the two share one Philox mask).
"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import torch

from llm_adapters import ops
from llm_adapters.ops import _backend, _choice, _custom, _dispatch, triton_backend

CPU = torch.device("cpu")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Private table folders, nothing read or chosen yet, auto (not the tests' torch)."""
    monkeypatch.setenv("LLM_ADAPTERS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLM_ADAPTERS_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_choice, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setattr(ops, "_resolved", {})
    _choice.reset()
    yield tmp_path
    _choice.reset()


class _CudaStandIn:
    """A "cuda" backend that runs the Triton kernels: what auto sends to cuda is observable
    (calls are counted) and gives the same result bit for bit."""

    name = "cuda"
    ops = frozenset({"lora", "series"})
    stores_mask = False

    def __init__(self):
        self.calls = 0

    def available(self):
        return None

    def supports_device(self, device):
        return None

    def keep_mask(self, shape, p, seed, device):
        return triton_backend.BACKEND.keep_mask(shape, p, seed, device)

    def lora_forward(self, *args):
        self.calls += 1
        return triton_backend.lora_forward(*args)

    def lora_backward(self, *args):
        return triton_backend.lora_backward(*args)

    def series_forward(self, *args):
        self.calls += 1
        return triton_backend.series_forward(*args)

    def series_backward(self, *args):
        return triton_backend.series_backward(*args)


@pytest.fixture
def fake_gpu(fresh, monkeypatch):
    """The CPU treated as a GPU; the real cuda backend cannot run here, so it is no candidate."""
    monkeypatch.setattr(_dispatch, "_on_gpu", lambda device: True)
    return fresh


@pytest.fixture
def fake_gpu_with_cuda(fake_gpu, monkeypatch):
    """As fake_gpu, with the cuda stand-in loaded and ready (its ops created privately)."""
    cuda = _CudaStandIn()
    monkeypatch.setitem(_dispatch._loaded, "cuda", cuda)
    monkeypatch.setattr(_dispatch, "_ready_for_auto", lambda name: True)
    monkeypatch.setattr(_custom, "_bound", {
        **_custom._bound,
        ("cuda", "lora"): _custom.BoundOp(_custom.LORA, cuda),
        ("cuda", "series"): _custom.BoundOp(_custom.SERIES, cuda),
    })
    return cuda


def _key(m=40, k=24, n=20, r=4, dropout=False, op="lora", dtype=torch.float32):
    return _choice.shape_key(op, dtype, m, k, n, r, dropout)


def _write_table(path, device, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": _choice.FORMAT, "device": device,
            "rows": [{**dict(zip(_choice.KEY_FIELDS, key)), "ms": ms} for key, ms in rows]}
    path.write_text(json.dumps(data))


def test_shape_key_buckets_rows_like_the_triton_autotuner():
    assert [_choice.m_bucket(m) for m in (1, 16, 17, 32, 33, 1000, 1024, 1025)] == [
        16, 16, 32, 32, 64, 1024, 1024, 2048]
    assert _key(m=600) == ("lora", "float32", 1024, 24, 20, 4, False)
    assert _key(op="series", dtype=torch.bfloat16, dropout=True)[:2] == (
        "series", "bfloat16")


def test_every_loadable_backend_satisfies_the_protocol():
    names = ops.available_backends()
    assert "torch" in names and "triton" in names
    for name in names:
        assert isinstance(_dispatch.loaded_backend(name), _backend.Backend), name
    assert not isinstance(object(), _backend.Backend)


def test_auto_on_cpu_is_torch_or_the_interpreter(fresh, monkeypatch):
    assert _dispatch.resolve_backend("lora", CPU).name == "triton"  # TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.resolve_backend("lora", CPU).name == "torch"
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET"):
        _dispatch.resolve_backend("series", CPU, "triton")  # asked for: an error, no fallback
    monkeypatch.setenv("LLM_ADAPTERS_BACKEND", "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.resolve_backend("lora", CPU).name == "torch"  # the variable wins over auto
    assert _dispatch.resolve_backend("lora", CPU, "triton").name == "triton"  # keyword wins


def test_auto_on_a_gpu_is_triton_without_a_table_and_never_torch(fake_gpu, monkeypatch):
    assert _dispatch.resolve_backend("lora", CPU, None, _key()).name == "triton"
    assert _dispatch.gpu_candidates("lora", CPU) == ["triton"]  # cuda: cannot run a CPU tensor
    assert not _dispatch.shape_dependent("lora", CPU, None)
    # one mask stream: auto's keep-mask on the GPU is the Philox one, never the torch backend's
    mask = ops.dropout_mask((9, 40), 0.3, 5)
    assert torch.equal(mask, ops.dropout_mask((9, 40), 0.3, 5, backend="triton"))
    assert not torch.equal(mask, ops.dropout_mask((9, 40), 0.3, 5, backend="torch"))

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # now no GPU backend can run: an error naming
    with pytest.raises(ops.BackendUnavailableError, match="backend='torch'"):  # the way out
        _dispatch.resolve_backend("lora", CPU)
    assert _dispatch.resolve_backend("lora", CPU, "torch").name == "torch"  # asked for: runs


def test_the_table_sends_a_shape_to_cuda_only_where_cuda_is_faster(fake_gpu_with_cuda, fresh):
    _write_table(fresh / "shipped" / "gpu.json", "cpu", [
        (_key(m=16), {"triton": 1.0, "cuda": 2.0}),
        (_key(m=64), {"triton": 2.0, "cuda": 1.0}),  # the user's row below replaces it
        (_key(m=256), {"triton": 2.0, "cuda": 1.0}),
    ])
    _write_table(fresh / "shipped" / "other.json", "another GPU", [
        (_key(m=1024), {"triton": 9.0, "cuda": 1.0}),
    ])
    _write_table(_choice.user_table_path("cpu"), "cpu", [
        (_key(m=64), {"triton": 1.0, "cuda": 3.0}),
        (_key(m=4096), {"cuda": 1.0, "torch": 0.1}),  # no triton time: no comparison
        (_key(m=16384), {"triton": 3.0, "cuda": 1.0, "torch": 0.1}),  # torch is never taken
    ])

    def pick(m, **kw):
        return _dispatch.resolve_backend(kw.get("op", "lora"), CPU, None, _key(m=m, **kw)).name

    assert pick(16) == "triton"
    assert pick(50) == "triton"  # bucket 64: the user's row, over the shipped one
    assert pick(200) == "cuda"  # bucket 256
    assert pick(1000) == "triton"  # only another GPU's table has this shape
    assert pick(4096) == "triton"
    assert pick(16384) == "cuda"
    assert pick(256, dropout=True) == "triton"  # a shape the table does not have
    assert pick(256, op="series") == "triton"
    assert _dispatch.resolve_backend("lora", CPU).name == "triton"  # no shape, no table
    assert _dispatch.shape_dependent("lora", CPU, None)
    assert not _dispatch.shape_dependent("series", CPU, None)  # no row compares them
    assert not _dispatch.shape_dependent("lora", CPU, "triton")


def test_a_broken_table_is_ignored_not_fatal(fake_gpu_with_cuda, fresh):
    path = _choice.user_table_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    (fresh / "shipped").mkdir()
    (fresh / "shipped" / "gpu.json").write_text(json.dumps(
        {"format": _choice.FORMAT, "device": "cpu",
         "rows": [{"op": "lora", "dtype": "float32", "m": 64},  # a row missing fields
                  {**dict(zip(_choice.KEY_FIELDS, _key(m=16))),
                   "ms": {"triton": 2.0, "cuda": 1.0}}]}))
    assert _dispatch.resolve_backend("lora", CPU, None, _key(m=40)).name == "triton"
    assert _dispatch.resolve_backend("lora", CPU, None, _key(m=16)).name == "cuda"


_TIMERS = ("perf_counter", "perf_counter_ns", "monotonic", "monotonic_ns", "time", "time_ns",
           "process_time", "process_time_ns", "thread_time", "thread_time_ns")


def _files(*roots):
    return sorted(str(p) for root in roots for p in root.rglob("*"))


def test_an_auto_call_on_a_gpu_times_nothing_and_writes_nothing(
        fake_gpu_with_cuda, fresh, monkeypatch):
    """ops.lora_linear / series_adapter under auto on (fake) CUDA tensors, with a user table
    that sends one shape to cuda: no clock of the package is read, no thread started, no file
    written under HOME or the cache folders, and the result is the backend's own."""
    home, xdg = fresh / "home", fresh / "xdg"
    home.mkdir()
    xdg.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.delenv("LLM_ADAPTERS_CACHE_DIR")  # the default place: under XDG_CACHE_HOME
    table = xdg / "llm_adapters" / "backend_choice" / "cpu.json"
    _write_table(table, "cpu", [(_key(m=16, k=24, n=20, r=4, dropout=True),
                                 {"triton": 2.0, "cuda": 1.0})])
    assert _choice.user_table_path("cpu") == table
    before = _files(home, xdg)

    used = []

    def spy(where, fn):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("llm_adapters"):
                used.append(f"{where} from {caller}")
            return fn(*args, **kwargs)

        return wrapped

    clocks = {name: getattr(time, name) for name in _TIMERS}
    for name, clock in clocks.items():
        monkeypatch.setattr(time, name, spy(f"time.{name}", clock))
    for mod_name, mod in list(sys.modules.items()):  # `from time import perf_counter` too
        if mod_name.startswith("llm_adapters") and mod is not None:
            for name, clock in clocks.items():
                if getattr(mod, name, None) is clock:
                    monkeypatch.setattr(mod, name, spy(f"{mod_name}.{name}", clock))
    monkeypatch.setattr(torch.cuda, "synchronize", spy("cuda.synchronize", lambda *a: None))
    monkeypatch.setattr(torch.cuda, "Event", spy("cuda.Event", lambda *a, **k: None))
    monkeypatch.setattr(threading.Thread, "start", spy("Thread.start", threading.Thread.start))

    cuda = fake_gpu_with_cuda
    w, a, b = torch.randn(20, 24), torch.randn(4, 24, requires_grad=True), torch.randn(20, 4)
    small = torch.randn(9, 24, requires_grad=True)  # bucket 16: the table says cuda
    big = torch.randn(100, 24, requires_grad=True)  # bucket 128: no row, triton
    y_small = ops.lora_linear(small, w, None, a, b, scaling=2.0, dropout_p=0.1, seed=3)
    assert cuda.calls == 1
    y_big = ops.lora_linear(big, w, None, a, b, scaling=2.0, dropout_p=0.1, seed=3)
    (y_small.sum() + y_big.sum()).backward()
    ops.series_adapter(big, torch.randn(3, 24), torch.randn(24, 3)).sum().backward()
    assert cuda.calls == 1
    assert used == []
    assert _files(home, xdg) == before

    ref = ops.lora_linear(small, w, None, a, b, 2.0, 0.1, seed=3, backend="triton")
    torch.testing.assert_close(y_small, ref, rtol=0, atol=0)
    down, up = torch.randn(3, 24), torch.randn(24, 3)
    z = ops.series_adapter(big, down, up)
    torch.testing.assert_close(z, ops.series_adapter(big, down, up, backend="triton"),
                               rtol=0, atol=0)


def test_tune_backends_writes_the_table_auto_reads(fresh, capsys):
    from llm_adapters.bench import tune

    out = fresh / "table.json"
    rc = tune.main(["--device", "cpu", "--op", "lora", "--tokens", "20", "--hidden", "24",
                    "--rank", "4", "--dropout", "0", "--repeats", "2", "--backends", "torch",
                    "triton", "cuda", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "leaving out backend 'cuda'" in text
    written = json.loads(out.read_text())
    ms = written["rows"][0]["ms"]
    faster = min(ms, key=ms.get)
    assert text.splitlines()[-3].split()[-2:] == [faster, "-"]  # the row: winner, no cuda
    assert written["device"] == "cpu" and written["format"] == _choice.FORMAT
    assert [(r["op"], r["m"], set(r["ms"])) for r in written["rows"]] == [
        ("lora", 32, {"torch", "triton"})]
    assert all(t > 0 for t in ms.values())
    # the user's table got the same row, and the reader returns it
    user = json.loads(_choice.user_table_path("cpu").read_text())
    assert user["rows"] == written["rows"]
    assert _choice.rows_for("cpu") == {_key(m=20, k=24, n=24): ms}


def test_tune_backends_no_save_leaves_the_user_table_alone(fresh, capsys):
    from llm_adapters.bench import tune

    rc = tune.main(["--device", "cpu", "--op", "series", "--tokens", "8", "--hidden", "16",
                    "--rank", "2", "--dropout", "0", "--repeats", "1", "--no-save"])
    assert rc == 0
    assert "series " in capsys.readouterr().out
    assert not (fresh / "cache").exists()


def test_writing_keeps_rows_another_process_wrote(fresh):
    """Two processes tune different shapes at once; each write keeps the other's rows."""
    from llm_adapters.bench.tune import write_table

    path = _choice.user_table_path("gpu")
    write_table(path, "gpu", {_key(m=16): {"torch": 1.0, "triton": 2.0}})
    write_table(path, "gpu", {_key(m=4096): {"torch": 3.0, "triton": 1.0},
                              _key(m=16): {"torch": 5.0, "triton": 1.0}})  # measured again
    assert _choice.read_table(path, "gpu") == {
        _key(m=16): {"torch": 5.0, "triton": 1.0}, _key(m=4096): {"torch": 3.0, "triton": 1.0}}
    write_table(path, "gpu", {_key(m=256): {"torch": 1.0}}, merge=False)
    assert _choice.read_table(path, "gpu") == {_key(m=256): {"torch": 1.0}}
    assert _choice.read_table(path, "another gpu") == {}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
