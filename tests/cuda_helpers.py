"""Shared by the tests of the `cuda` backend (test_cuda_extension, test_cuda_ops,
test_cuda_tensor_cores): the extension fixture, the op parity check against the shared float64
references (llm_adapters/bench/parity.py), and the runners that call the ops on CPU tensors."""

from __future__ import annotations

import os

import pytest
import torch

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops import cuda_backend
from llm_adapters.ops._custom import lora_op, series_op

BACKEND = cuda_backend.BACKEND
PREBUILT_OK = cuda_backend.extension_status()[0]
JIT_REASON = cuda_backend._cuda_build.jit_unavailable_reason()
needs_extension = pytest.mark.skipif(
    not PREBUILT_OK and JIT_REASON is not None,
    reason=f"the CUDA extension is not built and cannot be JIT-built here: {JIT_REASON}",
)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
GPU_DTYPES = [torch.float16, torch.bfloat16]

MASK_CASES = [
    ((37, 129), 0.1, 0),
    ((5, 1000), 0.5, 2**40 + 12345),  # seed with a non-zero high word
    ((64, 333), 0.25, 2**62 - 7),
    ((3, 7), 0.9, 2**32 - 1),
    ((9, 11), 0.3, 2**31),
    ((1, 1), 0.0, 5),
    ((17, 8), 1e-6, 77),  # p below 1/65536: threshold 0, everything kept
]


@pytest.fixture(scope="module")
def ext():
    """torch.ops.llm_adapters_C, built on first use. Without a GPU the JIT build targets sm_90
    only (LLM_ADAPTERS_CUDA_ARCHS, unless set), the same as csrc/build_check.sh, so a build
    folder it left (LLM_ADAPTERS_CUDA_BUILD_DIR) is reused instead of compiling again."""
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available() and not os.environ.get("LLM_ADAPTERS_CUDA_ARCHS"):
            mp.setenv("LLM_ADAPTERS_CUDA_ARCHS", "9.0")
        return cuda_backend.load_extension()


@pytest.fixture(params=["partials", "reduce"])
def dw_path(request, monkeypatch):
    """Both sources of dB / dUp: the one-pass partials of grad_rows and reduce_rows."""
    monkeypatch.setattr(cuda_backend, "DW_PATH", request.param)
    return request.param


def max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return (t.double() - ref).abs().max().item() if t.numel() else 0.0


def assert_close(name, ours, same_dtype, ref, dtype):
    """DESIGN §6 (parity.assert_parity): ours may differ from the float64 reference by at most
    about 2x what the same computation in PyTorch at `dtype` does, plus one unit in the last
    place of the output's scale (so an exact PyTorch result does not demand an exact kernel)."""
    magnitude = max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)
    parity.assert_parity(name, ours, ref, same_dtype, rel_floor=torch.finfo(dtype).eps,
                         magnitude=magnitude)


def assert_within(name, ours, same_dtype, ref, bound, dtype, operand="float32-operand"):
    """assert_close against the float64 reference (skipped when same_dtype is None), and the
    error within `bound` everywhere: the bound of float32-accurate operands, which rounding an
    operand to 16 bits would break."""
    if same_dtype is not None:
        assert_close(name, ours, same_dtype, ref, dtype)
    excess = ((ours.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"{name}: beyond the {operand} bound by {excess}"


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
            for t in tensors]


def _grads(out, inputs, g):
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, want, g)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def run_lora(x, w, bias, a, b, scale, p, activation, seed, a_bias, b_bias):
    if x.is_cuda:  # the public op, as users call it
        return ops.lora_linear(x, w, bias, a, b, scaling=scale, dropout_p=p,
                               activation=activation, seed=seed, lora_a_bias=a_bias,
                               lora_b_bias=b_bias, backend="cuda")
    # CPU tensors: ops.lora_linear refuses them for backend="cuda", so call the custom op the
    # way it does; the extension's CPU ops run the kernel code on host threads
    scale_t, scale_f = (scale.reshape(()), 1.0) if torch.is_tensor(scale) else (None, scale)
    return lora_op(BACKEND)(x, w, bias, a, b, a_bias, b_bias, scale_t, scale_f, p,
                            torch.tensor(seed), activation)[0]


def run_series(h, down, up, scale, p, activation, seed, d_bias, u_bias):
    if h.is_cuda:
        return ops.series_adapter(h, down, up, scaling=scale, activation=activation,
                                  dropout_p=p, seed=seed, down_bias=d_bias, up_bias=u_bias,
                                  backend="cuda")
    scale_t, scale_f = (scale.reshape(()), 1.0) if torch.is_tensor(scale) else (None, scale)
    return series_op(BACKEND)(h, down, up, d_bias, u_bias, scale_t, scale_f, p,
                              torch.tensor(seed), activation)[0]


def check_parity(kind, dtype, m, k, n, r, p, activation, learned_scale, biases, seed=1234,
                  device="cuda"):
    dev = torch.device(device)
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=dtype, requires_grad=True)
    scale = torch.tensor(0.7, device=dev, requires_grad=True) if learned_scale else 1.7
    if kind == "lora":
        w = torch.randn(n, k, device=dev, dtype=dtype) / k**0.5
        bias = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
        a = (torch.randn(r, k, device=dev) / k**0.5).requires_grad_()
        b = (torch.randn(n, r, device=dev) / r**0.5).requires_grad_()
        a_bias = torch.randn(r, device=dev, requires_grad=True) if biases else None
        b_bias = torch.randn(n, device=dev, requires_grad=True) if biases else None
        y = run_lora(x, w, bias, a, b, scale, p, activation, seed, a_bias, b_bias)
        inputs = [x, bias, a, b, a_bias, b_bias] + ([scale] if learned_scale else [])
        keep = BACKEND.keep_mask((m, k), p, seed, dev) if p > 0 else None
        ref_fn = lambda xs, dt: parity.lora_reference(  # noqa: E731
            xs[0], w.to(dt), xs[1], xs[2], xs[3], scaling=xs[6] if learned_scale else scale,
            activation=activation, keep=keep, inv_keep=dropout_threshold(p)[1],
            lora_a_bias=xs[4], lora_b_bias=xs[5])
    else:
        n = k
        down = (torch.randn(r, k, device=dev) / k**0.5).requires_grad_()
        up = (torch.randn(k, r, device=dev) / r**0.5).requires_grad_()
        d_bias = torch.randn(r, device=dev, requires_grad=True) if biases else None
        u_bias = torch.randn(k, device=dev, requires_grad=True) if biases else None
        y = run_series(x, down, up, scale, p, activation, seed, d_bias, u_bias)
        inputs = [x, down, up, d_bias, u_bias] + ([scale] if learned_scale else [])
        keep = BACKEND.keep_mask((m, k), p, seed, dev) if p > 0 else None
        ref_fn = lambda xs, dt: parity.series_reference(  # noqa: E731
            xs[0], xs[1], xs[2], scaling=xs[5] if learned_scale else scale,
            activation=activation, keep=keep, inv_keep=dropout_threshold(p)[1],
            down_bias=xs[3], up_bias=xs[4])
    assert y.dtype == dtype and y.shape == (m, n)
    g = torch.randn(m, n, device=dev, dtype=dtype)
    ours = _grads(y, inputs, g)

    ref_in = _leaves(inputs, torch.float64)
    ref_out = ref_fn(ref_in, torch.float64)
    ref_grads = _grads(ref_out, ref_in, g.double())
    # the same computation in PyTorch at `dtype` (adapter weights cast to it, as PEFT does)
    same_in = _leaves(inputs, dtype)
    same_out = ref_fn(same_in, dtype)
    same_grads = _grads(same_out, same_in, g)

    tag = f"{kind} {dtype} m={m} k={k} n={n} r={r} p={p} {activation}"
    assert_close(f"{tag} output", y, same_out, ref_out.detach(), dtype)
    names = ["dx", "dbias", "dA", "dB", "da_bias", "db_bias", "dscale"] if kind == "lora" else \
        ["dh", "dDown", "dUp", "ddown_bias", "dup_bias", "dscale"]
    for name, got, same, ref in zip(names, ours, same_grads, ref_grads):
        if ref is None:
            continue
        assert got is not None and got.shape == ref.shape, name
        assert_close(f"{tag} {name}", got, same, ref, dtype)


# CPU: the same parity checks through the extension's CPU ops, which run the kernels' own code
# (csrc/kernels.cuh) on host threads with a barrier for __syncthreads. Small odd shapes cover
# the scalar and 16-byte vector paths, row/column tails, rank tiles 8..64 and beyond, split
