"""The `cuda` backend's DoRA functions against the float64 reference of test_triton_dora.py.

CPU: through the extension's CPU ops, which run the kernels' own code (csrc/) on host threads;
the reference draws the Triton kernels' keep-mask, so these checks also hold the two backends'
masks to bit identity under DoRA's dropout. The column scale and the bias run in the expand
kernel's epilogue (csrc/expand.cuh); N = 67 takes its element-wise stores, N = 136 its 16-byte
vector stores (and the element-wise ones for the last partial vector of a row).
"""

from __future__ import annotations

import cuda_helpers
import pytest
import torch
from cuda_helpers import needs_extension
from test_triton_dora import SCALING, SEED, TOL, _check, _make, _reference, _run

from llm_adapters.ops import cuda_backend

ext = cuda_helpers.ext  # the fixture every cuda test file shares
# half precision rounds x Wᵀ (cuBLAS's output, the expand's input) before the rank-r update is
# added; the Triton kernel keeps both in one float32 accumulator
CUDA_TOL = {**TOL, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@needs_extension
@pytest.mark.parametrize("add", [False, True], ids=["dora", "dora_add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n", [67, 136])
@pytest.mark.parametrize("r,p,bias,save_t,strided", [
    (3, 0.0, True, True, False), (8, 0.25, False, True, True), (8, 0.25, True, False, False),
])
def test_matches_float64_reference_on_host_threads(ext, monkeypatch, add, dtype, n, r, p, bias,
                                                   save_t, strided):
    import test_triton_dora

    monkeypatch.setattr(test_triton_dora, "TOL", CUDA_TOL)
    v = _make(37, 136, n, r, dtype, bias, strided)
    got = _run(v, p, SEED, save_t, add, tb=cuda_backend)
    ref = _reference(v, p, SEED, add)
    acc = torch.float32
    _check("y", got["y"], ref["y"], dtype, dtype)
    if save_t:
        _check("dcol", got["dcol"], ref["dcol"], dtype, acc)
    else:
        assert got["t"].numel() == 0 and got["dcol"].numel() == 0
    for name in ("dx", "dbias", "da", "db"):
        _check(name, got[name], ref[name], dtype, dtype if name == "dx" else acc)
    if add:
        _check("dy0", got["dy0"], ref["dy0"], dtype, dtype)


@needs_extension
def test_column_scale_without_t_is_a_clear_error(ext):
    v = _make(5, 16, 9, 2, torch.float32, True, False)
    y, s_pre, mask, t = cuda_backend.dora_forward(v["x"], v["weight"], v["bias"], v["a"],
                                                  v["b"], v["c"], SCALING, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="save_t=False"):
        cuda_backend.dora_backward(v["g"], v["x"], v["weight"], v["a"], v["b"], v["c"],
                                   SCALING, 0.0, 1, s_pre, mask, t, (True, True, True, True, True))
