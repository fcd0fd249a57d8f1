"""The `cuda` backend of ops.lora_add against float64 (the checks of test_triton_lora_add.py).

CPU: through the extension's CPU ops, which run the kernels' own code (csrc/) on host threads;
the reference uses the Triton kernels' keep-mask, so these checks also hold the two backends'
Philox masks to bit identity. GPU (`pytest -m gpu`): the public op at LLaMA shapes.
"""

from __future__ import annotations

import cuda_helpers
import pytest
import torch
from cuda_helpers import BACKEND, needs_extension
from test_triton_lora_add import _check_case, _make

from llm_adapters import ops
from llm_adapters.bench import parity
from llm_adapters.ops._custom import lora_add_op

ext = cuda_helpers.ext  # the fixture every cuda test file shares


def _run_cuda(lv, act, p, seed):
    if lv["x"].is_cuda:  # the public op, as users call it
        return ops.lora_add(lv["y0"], lv["x"], lv["lora_a"], lv["lora_b"], scaling=lv["scale"],
                            dropout_p=p, activation=act, seed=seed,
                            lora_a_bias=lv["lora_a_bias"], lora_b_bias=lv["lora_b_bias"],
                            backend="cuda")
    # CPU tensors: ops.lora_add refuses them for backend="cuda", so call the custom op the way
    # it does (2-D rows, the scale split into a tensor or a float)
    x, y0, scale = lv["x"], lv["y0"], lv["scale"]
    scale_t, scale_f = (scale.reshape(()), 1.0) if torch.is_tensor(scale) else (None, scale)
    y = lora_add_op(BACKEND)(
        x.reshape(-1, x.shape[-1]), y0.reshape(-1, y0.shape[-1]), lv["lora_a"], lv["lora_b"],
        lv["lora_a_bias"], lv["lora_b_bias"], scale_t, scale_f, p, torch.tensor(seed), act)[0]
    return y.view(y0.shape)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("p,act,biases,r", [(0.0, "identity", False, 1), (0.25, "tanh", True, 12)])
def test_parity_on_host_threads(ext, dtype, p, act, biases, r):
    # K = 136: the 16-byte vector path in every dtype; N = 67 and M = 37: ragged tails
    _check_case(37, 136, 67, r, dtype, act, p, branch_bias=biases, learned=biases,
                run=_run_cuda)


@needs_extension
def test_scalar_path_three_dim_x_no_x_grad_on_host_threads(ext):
    # K = 129 and N = 41: the scalar path; x of a first layer
    _check_case(13, 129, 41, 12, torch.float16, "tanh", 0.25, lead=(3,), x_grad=False,
                learned=False, run=_run_cuda)


@needs_extension
def test_same_numbers_as_triton_on_host_threads(ext):
    # float32 with the same seed: the two backends agree to accumulation order
    t = _make(37, 136, 67, 12, torch.float32)
    lv = parity.leaves(t, wrt=["x", "lora_a", "lora_b"])
    y_cuda = _run_cuda(lv, "tanh", 0.3, 99)
    lv2 = parity.leaves(t, wrt=["x", "lora_a", "lora_b"])
    y_triton = ops.lora_add(lv2["y0"], lv2["x"], lv2["lora_a"], lv2["lora_b"],
                            scaling=lv2["scale"], dropout_p=0.3, activation="tanh", seed=99,
                            lora_a_bias=lv2["lora_a_bias"], lora_b_bias=lv2["lora_b_bias"],
                            backend="triton")
    torch.testing.assert_close(y_cuda, y_triton, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_cuda)
    for a, b in zip(torch.autograd.grad(y_cuda, [lv[n] for n in ("x", "lora_a", "lora_b")], g),
                    torch.autograd.grad(y_triton, [lv2[n] for n in ("x", "lora_a", "lora_b")],
                                        g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_extension
def test_opcheck_on_host_threads(ext):
    t = parity.leaves(_make(21, 40, 30, 12, torch.float16), wrt=["x", "y0", "lora_a"])
    torch.library.opcheck(lora_add_op(BACKEND), (
        t["x"], t["y0"], t["lora_a"], t["lora_b"], t["lora_a_bias"], t["lora_b_bias"],
        t["scale"], 1.0, 0.2, torch.tensor(5), "tanh"))


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_llama_shapes(ext, dtype):
    _check_case(4096, 4096, 4096, 16, dtype, "identity", 0.1, run=_run_cuda)
    _check_case(1000, 1000, 3000, 24, dtype, "tanh", 0.1, run=_run_cuda)
