"""The CUDA extension's low-level ops: schemas defined in Python (llm_adapters/ops/_cuda_ops.py),
kernels registered by csrc/ops.cpp only through TORCH_LIBRARY_IMPL. Checked on the extension's
CPU kernels (the CUDA kernel code run on host threads); the same opcheck on CUDA tensors runs
under `pytest -m gpu`."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from llm_adapters.ops import _cuda_ops, cuda_backend

_jit_reason = cuda_backend._cuda_build.jit_unavailable_reason()
pytestmark = pytest.mark.skipif(
    not cuda_backend.extension_status()[0] and _jit_reason is not None,
    reason=f"the CUDA extension is not built and cannot be JIT-built here: {_jit_reason}",
)
_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def ext():
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available() and not os.environ.get("LLM_ADAPTERS_CUDA_ARCHS"):
            mp.setenv("LLM_ADAPTERS_CUDA_ARCHS", "9.0")  # as csrc/build_check.sh: its build
        return cuda_backend.load_extension()  # folder is reused


def test_schemas_come_from_python_only(ext):
    source = (Path(cuda_backend._cuda_build.CSRC) / "ops.cpp").read_text()
    assert not re.search(r"TORCH_LIBRARY\s*\(", source), "ops.cpp must not define schemas"
    assert re.search(r"TORCH_LIBRARY_IMPL\s*\(\s*llm_adapters_C\s*,\s*CUDA", source)
    for name, schema in _cuda_ops.SCHEMAS.items():
        op = getattr(ext, name).default
        assert str(op._schema) == f"{_cuda_ops.NAMESPACE}::{name}{schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_opcheck_low_level_ops(ext, device, dt):
    """Schema, fake (meta) function and dispatch of every low-level op agree with its kernel:
    float32 takes the CUDA-core kernels, bfloat16 the tensor-core ones (16-bit)."""
    m, k, n, r = 9, 24, 16, 3
    x = torch.randn(m, k, device=device, dtype=dt)
    w = torch.randn(r, k, device=device)
    h = torch.randn(m, r, device=device)
    g = torch.randn(m, n, device=device, dtype=dt)
    up = torch.randn(n, r, device=device)
    scale = torch.tensor(0.5, device=device)
    t = 6554  # the 16-bit dropout threshold of p = 0.1
    cases = [
        (ext.shrink, (x, w, torch.randn(r, device=device), t, 1.1, 7, True)),
        (ext.shrink, (x, w, None, 0, 1.0, 0, False)),
        (ext.reduce_rows, (x, h, 1, t, 7, True)),
        (ext.expand_add_, (torch.randn(m, n, device=device, dtype=dt), None, h, 2,
                           up, None, scale, 2.0, t, 7)),
        (ext.expand_add_, (torch.randn(m, n, device=device, dtype=dt), g, h, 0,
                           up, torch.randn(n, device=device), None, 2.0, 0, 0, False)),
        (ext.series_forward, (g, up, up, None, torch.randn(n, device=device), None, 1.5, 1, t,
                              1.1, 7)),
        (ext.series_forward, (g, up, up, torch.randn(r, device=device), None, scale, 1.0, 0, 0,
                              1.0, 0, False)),
        (ext.grad_rows, (g, up, h, 1, scale, 1.0, True, True, up, 1.0, t, 7)),
        (ext.grad_rows, (g, up, h, 0, None, 2.0, False, False, None, 1.0, 0, 0)),
        (ext.keep_mask_, (torch.empty(5, 7, dtype=torch.bool, device=device), t, 3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_fake_shapes_match_the_kernels(ext):
    from torch._subclasses.fake_tensor import FakeTensorMode

    m, n, r = 11, 20, 5
    g, up, h = torch.randn(m, n), torch.randn(n, r), torch.randn(m, r)
    real = ext.grad_rows(g, up, h, 0, None, 1.0, True, False, up, 1.0, 0, 0)
    with FakeTensorMode() as mode:
        fake = ext.grad_rows(mode.from_tensor(g), mode.from_tensor(up), mode.from_tensor(h), 0,
                             None, 1.0, True, False, mode.from_tensor(up), 1.0, 0, 0)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real]
    assert [t.dtype for t in fake] == [t.dtype for t in real]


def test_jit_cache_counts_as_ready_only_when_current(monkeypatch, tmp_path):
    """auto considers the cuda backend only when no compile is needed: an up-to-date library in
    the JIT cache counts, a missing or older-than-csrc one does not."""
    build = cuda_backend._cuda_build
    monkeypatch.setenv("LLM_ADAPTERS_CUDA_BUILD_DIR", str(tmp_path))
    assert build.jit_cached() is None
    lib = tmp_path / f"{build.EXTENSION_NAME}.so"
    lib.write_bytes(b"")
    newest = max(p.stat().st_mtime for p in build.CSRC.iterdir() if p.is_file())
    os.utime(lib, (newest + 10, newest + 10))
    assert build.jit_cached() == lib
    os.utime(lib, (newest - 10, newest - 10))
    assert build.jit_cached() is None


def test_kernel_bandwidth_bench_on_host_threads(ext, tmp_path):
    """The single-kernel benchmark runs every kernel and variant (here on the host emulation,
    so the times mean nothing) and the two variants of each kernel agree."""
    from llm_adapters.bench import kernels, summary

    rows = []
    for kernel in kernels.KERNELS:
        rows += kernels.kernel_bandwidth(kernel, ms=(21,), k=40, r=3, dtype=torch.float16,
                                         device="cpu", p=0.1, reps=1, peak_tbps=1.0)
    assert [(r["kernel"], r["variant"]) for r in rows] == [
        (kernel, variant) for kernel in kernels.KERNELS
        for variant in ("tensor_cores", "cuda_cores")]
    for r in rows:
        assert r["ms"] > 0 and r["gbps"] > 0 and r["pct_peak"] == pytest.approx(r["gbps"] / 10)
        assert r["max_abs_diff_between_variants"] < 1e-2
    expand = rows[2]
    assert expand["gbps"] == pytest.approx(2 * 21 * 40 * 2 / (expand["ms"] * 1e-3) / 1e9)
    grad = rows[6]  # g read once
    assert grad["gbps"] == pytest.approx(21 * 40 * 2 / (grad["ms"] * 1e-3) / 1e9)
    with pytest.raises(ValueError, match="unknown kernel 'gemm'"):
        kernels.kernel_bandwidth("gemm", device="cpu")

    for r in rows:  # as if measured on a GPU at M = 512: 69% and 90% of the peak
        r["m"], r["pct_peak"] = 512, 69.0 if r["kernel"] == "expand" else 90.0
    (tmp_path / "kernels-bandwidth.json").write_text(__import__("json").dumps(rows))
    lines: list[str] = []
    summary.summarise(str(tmp_path), printer=lines.append)
    assert lines[-1] == ("shrink / expand at M >= 512: lowest 69.0% of peak (expand, M=512; "
                         "target >= 70%) MISSED")
