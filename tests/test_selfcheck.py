"""`llm-adapters check`: the table, the exit status, a broken backend caught, --model shapes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from llm_adapters import cli, ops, selfcheck
from llm_adapters.bench.parity import parity_verdict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_check_exits_0_on_cpu_and_prints_the_table(tmp_path):
    """The command as a user runs it: a fresh process that sets TRITON_INTERPRET itself, so
    the triton backend is checked under the interpreter, bf16 skipped there with the reason."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "LLM_ADAPTERS_BACKEND")}
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "llm_adapters.cli", "check", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    assert "max rel err" in text and "bound" in text and "OK" in text.splitlines()[-1]
    assert "TRITON_INTERPRET=1 set by this check" in text
    assert "cannot run bf16 tl.dot" in text
    report = json.loads(out.read_text())
    assert report["status"] == 0
    rows = report["rows"]
    ran = {(r["backend"], r["op"], r["dtype"]) for r in rows if r["status"] == "pass"}
    for op in ("lora", "parallel(tanh)", "series(tanh)"):
        for dtype in ("bfloat16", "float16", "float32"):
            assert ("torch", op, dtype) in ran
        for dtype in ("float16", "float32"):
            assert ("triton", op, dtype) in ran
    assert {r["status"] for r in rows} <= {"pass", "skip"}
    for r in rows:
        if r["status"] == "pass":  # every gradient was compared, each within its own bound
            assert set(r["errors"]) == set(r["bounds"]) and len(r["errors"]) >= 4
            assert all(r["errors"][k] <= r["bounds"][k] for k in r["errors"])
            assert r["ms"] is not None and r["ms"] > 0


def _check(capsys, *argv) -> tuple[int, str]:
    code = cli.main(["check", *argv])
    return code, capsys.readouterr().out


class _GradTimes(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def test_a_wrong_gradient_fails_with_exit_1(capsys, monkeypatch):
    """A backend whose d_lora_a is 1% off (its lora_linear wrapped so): its LoRA and parallel
    rows fail, naming d_lora_a; its series rows (untouched) still pass; the exit status is 1."""
    real = ops.lora_linear

    def broken(x, weight, bias, lora_a, *args, **kwargs):
        return real(x, weight, bias, _GradTimes.apply(lora_a, 1.01), *args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", broken)
    code, out = _check(capsys, "--backends", "torch", "--dtypes", "float32", "float16",
                       "--reps", "0")
    assert code == 1, out
    rows = [line.split() for line in out.splitlines() if line.startswith("torch ")]
    assert len(rows) == 12
    for cells in rows:
        if cells[1] == "series(tanh)":
            assert "pass" in cells
        else:
            assert "FAIL" in cells and "d_lora_a" in cells
    assert "NOT OK" in out.splitlines()[-1]


def test_a_wrong_dropout_mask_fails(capsys, monkeypatch):
    """The reference uses the backend's own keep-mask (ops.dropout_mask); a backend whose
    reported mask is not the one it applied fails where dropout is on, and only there."""
    real = ops.dropout_mask
    monkeypatch.setattr(ops, "dropout_mask",
                        lambda shape, p, seed, *args, **kw: real(shape, p, seed + 1, *args, **kw))
    code, out = _check(capsys, "--backends", "torch", "--dtypes", "float32", "--reps", "0")
    assert code == 1
    for line in out.splitlines():
        if line.startswith("torch "):
            assert ("FAIL" in line) == (" p0.1 " in line), line


def test_rows_carry_designs_bound_for_every_tensor():
    """Each row's bound per tensor is DESIGN §6's rule on eager's same-dtype error (the
    benchmarks' parity_verdict), and the row shows the tensor nearest its bound."""
    rows = selfcheck.run_check(selfcheck.default_cases(torch.device("cpu"))[:2], ["torch"],
                               ["bfloat16", "float32"], torch.device("cpu"), reps=0,
                               stream=io.StringIO())
    assert len(rows) == 4
    for row in rows:
        dtype = selfcheck.DTYPES[row.dtype]
        assert row.status == "pass"
        assert set(row.errors) == {"out", "d_x", "d_lora_a", "d_lora_b", "d_bias"}
        ok, tol = parity_verdict(row.errors, row.eager_errors, dtype)
        assert ok and tol == row.bounds
        assert all(0 < e < 10 * torch.finfo(dtype).eps for e in row.eager_errors.values())
        ratio = {k: row.errors[k] / row.bounds[k] for k in row.errors}
        assert row.worst == max(ratio, key=ratio.get)
        assert (row.error, row.bound) == (row.errors[row.worst], row.bounds[row.worst])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_reduction_magnitudes_bound_the_sums(p):
    """With one row, a bias gradient is its single term: the magnitude is its norm exactly
    (which checks the dS formula behind d_lora_a_bias); the scale's is at least |d_scale|."""
    case = selfcheck.Case("parallel", 1, 24, 20, 5, p)
    base = selfcheck._inputs(case, torch.float64, torch.device("cpu"))
    g = base.pop("grad")
    t = selfcheck._leaves(case, base, torch.float64)
    keep = torch.rand(1, 24) > p if p else None
    inv_keep = 1 / (1 - p)
    selfcheck._fwd_bwd(lambda v: selfcheck.eager(case, v, keep, inv_keep), t, g)
    mags = selfcheck.reduction_magnitudes(case, t, g, keep, inv_keep)
    assert mags["d_lora_a_bias"] == pytest.approx(t["lora_a_bias"].grad.norm().item())
    assert mags["d_lora_b_bias"] == pytest.approx(t["lora_b_bias"].grad.norm().item())
    assert mags["d_scale"] >= abs(t["scale"].grad.item()) > 0


def _write_config(folder: Path, **cfg) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_model_shapes_from_a_llama_config(tmp_path):
    """Grouped-query attention (k/v narrower than q), the MLP width, the series adapter on the
    input side of gate/up_proj and the output side of down_proj (both the hidden width)."""
    path = _write_config(tmp_path / "llama", model_type="llama", hidden_size=24,
                         intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
    cases = selfcheck.model_cases(str(path), tokens=9, rank=4, bottleneck=6)
    got = [(c.op, c.layer, c.m, c.k, c.n, c.r) for c in cases]
    assert got == [
        ("lora", "q_proj", 9, 24, 24, 4), ("lora", "v_proj", 9, 24, 12, 4),
        ("parallel", "q_proj", 9, 24, 24, 6), ("parallel", "k_proj", 9, 24, 12, 6),
        ("series", "gate_proj", 9, 24, 24, 6),
    ]
    assert cases[0].dropout == 0.05 and cases[-1].dropout == 0.0


def test_model_shapes_from_gpt2_and_falcon_configs(tmp_path):
    gpt2 = _write_config(tmp_path / "gpt2", model_type="gpt2", n_embd=16, n_head=2, n_inner=None)
    cases = selfcheck.model_cases(str(gpt2), tokens=5, rank=2, bottleneck=3)
    assert [(c.op, c.layer, c.k, c.n) for c in cases] == [
        ("lora", "c_attn", 16, 48), ("parallel", "c_attn", 16, 48), ("series", "mlp.c_fc", 16, 16)
    ]
    falcon = _write_config(tmp_path / "falcon", model_type="falcon", hidden_size=32,
                           num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2)
    cases = selfcheck.model_cases(str(falcon / "config.json"), tokens=5, rank=2, bottleneck=3)
    assert (cases[0].k, cases[0].n) == (32, (4 + 2 * 2) * 8)
    assert [(c.layer, c.n) for c in cases if c.op == "series"] == [("dense_h_to_4h", 32)]


def test_model_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        selfcheck.model_cases(str(tmp_path), 4, 2, 2)
    path = _write_config(tmp_path / "odd", model_type="nosuchfamily", hidden_size=8)
    with pytest.raises(ValueError, match="nosuchfamily.*families with defaults"):
        selfcheck.model_cases(str(path), 4, 2, 2)
    path = _write_config(tmp_path / "nowidth", model_type="llama")
    with pytest.raises(ValueError, match="no hidden size"):
        selfcheck.model_cases(str(path), 4, 2, 2)


def test_check_with_model_runs_its_layers(tmp_path, capsys):
    path = _write_config(tmp_path / "tiny", model_type="mistral", hidden_size=20,
                         intermediate_size=36, num_attention_heads=4, num_key_value_heads=4)
    code, out = _check(capsys, "--model", str(path), "--backends", "torch", "triton",
                       "--dtypes", "float32", "--tokens", "7", "--rank", "4", "--bottleneck", "8",
                       "--reps", "1")
    assert code == 0, out
    for layer in ("q_proj", "gate_proj"):
        assert f"{layer} 7x20" in out
    assert out.count(" pass ") == 2 * 3  # lora q/v share a shape: one row per backend and op


def test_check_aot_calls_the_aot_module(monkeypatch, capsys):
    seen = {}

    def fake_main(argv=None):
        seen["argv"] = argv
        return 3

    fake = types.ModuleType("llm_adapters.triton_kernels.aot")
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "llm_adapters.triton_kernels.aot", fake)
    assert cli.main(["check", "--aot", "--subset", "ci"]) == 3
    assert seen["argv"] == ["--subset", "ci"]
    assert cli.main(["check", "--aot"]) == 3 and seen["argv"] == []


def test_check_aot_missing_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llm_adapters.triton_kernels.aot", None)
    assert cli.main(["check", "--aot"]) == 2
    assert "ahead-of-time compile check is not available" in capsys.readouterr().err


def test_cuda_backend_is_skipped_with_its_reason_on_cpu(capsys):
    code, out = _check(capsys, "--backends", "cuda")
    assert code == 1  # nothing ran: not a pass
    assert "skip: the CUDA kernels run CUDA tensors only" in out
