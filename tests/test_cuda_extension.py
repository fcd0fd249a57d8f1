"""The `cuda` backend's extension (csrc/, llm_adapters._C) and its Philox keep-mask.

CPU: the extension compiles and loads (JIT build, or the prebuilt llm_adapters._C), its status
is reported honestly, CPU tensors are refused with a clear error, the kernels' input checks
name the problem, and the Philox keep-mask the kernels use (compiled for the host from the same
csrc/philox.cuh) is bit-identical to the Triton kernels' mask under TRITON_INTERPRET=1 and to a
textbook Philox in Python. GPU (`pytest -m gpu`): the masks are identical to the Triton
backend's on the device. The ops' parity is in test_cuda_ops.py, the tensor-core kernels' in
test_cuda_tensor_cores.py.
"""

from __future__ import annotations

import os

import cuda_helpers
import pytest
import torch
from cuda_helpers import BACKEND, DEVICES, JIT_REASON, MASK_CASES, needs_extension

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.ops import cuda_backend

# the fixtures every cuda test file shares
ext = cuda_helpers.ext


# ---------------------------------------------------------------------------------------------
# CPU: build, status, errors, Philox bit-equality
# ---------------------------------------------------------------------------------------------


@needs_extension
def test_extension_builds_and_loads(ext):
    loaded, how = cuda_backend.extension_status()
    assert loaded, how
    assert "llm_adapters._C" in how or "JIT-built" in how
    for name in ("shrink", "expand_add_", "reduce_rows", "keep_mask_", "series_forward",
                 "grad_rows"):
        assert hasattr(ext, name), name
    assert BACKEND.available() is None


def test_extension_status_reports_why_not(monkeypatch):
    """With neither a prebuilt module nor nvcc, status and available() say why; no raise."""
    monkeypatch.setattr(
        cuda_backend, "_state", {"loaded": False, "how": "", "import_error": "not built (test)"}
    )
    monkeypatch.setattr(cuda_backend._cuda_build, "find_cuda_home", lambda: None)
    loaded, reason = cuda_backend.extension_status()
    assert not loaded
    assert "not built (test)" in reason and "nvcc was not found" in reason
    why = BACKEND.available()
    assert isinstance(why, str) and "nvcc" in why


def test_extension_status_is_consistent():
    loaded, reason = cuda_backend.extension_status()
    assert isinstance(loaded, bool) and reason
    if not loaded:
        assert "not built" in reason
        assert ("JIT-built on first use" in reason) == (JIT_REASON is None)


def test_cpu_tensors_get_a_clear_error():
    x = torch.randn(5, 7)
    w = torch.randn(6, 7)
    a, b = torch.randn(2, 7), torch.randn(6, 2)
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.lora_linear(x, w, None, a, b, backend="cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.series_adapter(x, a, torch.randn(7, 2), backend="cuda")
    assert "CUDA tensors only" in BACKEND.supports_device(torch.device("cpu"))
    assert BACKEND.supports_device(torch.device("cuda", 0)) is None


def test_float64_is_refused_before_any_kernel():
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        BACKEND.series_forward(x, x[:2], x.t()[:, :2], None, None, None, 1.0, 0.0, 0, "tanh")


@needs_extension
def test_cpp_input_checks_name_the_problem(ext):
    with pytest.raises(RuntimeError, match="bool"):
        ext.keep_mask_(torch.empty(3, 4), 100, 0)
    with pytest.raises(RuntimeError, match="threshold"):
        ext.keep_mask_(torch.empty(3, 4, dtype=torch.bool), 70000, 0)



@needs_extension
@pytest.mark.parametrize("shape,p,seed", MASK_CASES)
def test_keep_mask_bit_identical_to_triton(ext, shape, p, seed):
    """csrc/philox.cuh compiled for the host vs tl.randint under TRITON_INTERPRET=1."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton reference needs TRITON_INTERPRET=1 on a machine without a GPU")
    from llm_adapters.triton_kernels.dropout import keep_mask as triton_keep_mask

    ours = BACKEND.keep_mask(shape, p, seed, torch.device("cpu"))
    ref = triton_keep_mask(shape, p, seed, torch.device("cpu"))
    assert ours.dtype == torch.bool and ours.shape == ref.shape
    mismatch = (ours != ref).sum().item()
    assert mismatch == 0, f"{mismatch} of {ref.numel()} keep bits differ from the Triton mask"


def _philox_word0(counter: int, seed: int) -> int:
    """Philox-4x32-10 word 0 for counter (counter, 0, 0, 0): the textbook rounds in Python."""
    mask32 = 0xFFFFFFFF
    c0, c1, c2, c3 = counter & mask32, 0, 0, 0
    k0, k1 = seed & mask32, (seed >> 32) & mask32
    for _ in range(10):
        p0, p2 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & mask32, (p0 >> 32) ^ c3 ^ k1, p0 & mask32
        k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
    return c0


@needs_extension
def test_keep_mask_matches_a_python_philox(ext):
    """An independent check of the definition, element by element, on a few seeds."""
    for seed, p in [(0, 0.5), (2**40 + 3, 0.2), (2**63 - 1, 0.7)]:
        t, _ = dropout_threshold(p)
        shape = (3, 11)
        ours = BACKEND.keep_mask(shape, p, seed, torch.device("cpu")).flatten().tolist()
        ref = [(_philox_word0(i, seed) >> 16) >= t for i in range(shape[0] * shape[1])]
        assert ours == ref


@needs_extension
def test_row_block_input_checks_name_the_problem(ext):
    h = torch.randn(4, 8, dtype=torch.float16)
    w = torch.randn(8, 2)
    with pytest.raises(RuntimeError, match=r"down_t must be a contiguous float32 \[8, 2\]"):
        ext.series_forward(h, w.half(), w, None, None, None, 1.0, 1, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="up must be a contiguous float32"):
        ext.series_forward(h, w, torch.randn(2, 8), None, None, None, 1.0, 1, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="s_pre must be a contiguous float32"):
        ext.grad_rows(h, w, torch.randn(3, 2), 1, None, 1.0, True, False, None, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="dh_w must be a contiguous float32"):
        ext.grad_rows(h, w, torch.randn(4, 2), 1, None, 1.0, True, False, w.t(), 1.0, 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,p,seed", MASK_CASES + [((4096, 4096), 0.1, 2**61 + 99)])
def test_keep_mask_identical_to_triton_backend_gpu(ext, shape, p, seed):
    from llm_adapters.ops import triton_backend

    dev = torch.device("cuda")
    ours = BACKEND.keep_mask(shape, p, seed, dev)
    ref = triton_backend.BACKEND.keep_mask(shape, p, seed, dev)
    assert torch.equal(ours, ref)
    assert torch.equal(ours.cpu(), BACKEND.keep_mask(shape, p, seed, torch.device("cpu")))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_input_checks_name_the_problem(ext, device):
    dev = torch.device(device)
    x = torch.randn(4, 8, device=dev, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="w must be float32"):
        ext.shrink(x, torch.randn(2, 8, device=dev, dtype=torch.float16), None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="columns"):
        ext.shrink(x, torch.randn(2, 9, device=dev), None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.shrink(x.t(), torch.randn(2, 4, device=dev), None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match="activation"):
        ext.reduce_rows(x, torch.randn(4, 2, device=dev), 9, 0, 0)

