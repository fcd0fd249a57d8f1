"""The `cuda` backend's ops (ops.lora_linear / ops.series_adapter on csrc/) against float64.

CPU: the kernels themselves (csrc/kernels.cuh, run on host threads by the extension's CPU ops)
pass the float64 parity checks and opcheck: among them the fused series row-block kernels
(bottleneck 1..1024, hidden up to 16384) and the one-pass backward over g (grad_rows), through
both sources of dB / dUp (DW_PATH). GPU (`pytest -m gpu`): output and every gradient against a
float64 reference at odd and LLaMA shapes in float16 / bfloat16 (error at most about 2x the
same-dtype PyTorch error, DESIGN §6), dropout on and off, torch.library.opcheck of the custom
ops, torch.compile, deterministic backward.
"""

from __future__ import annotations

import cuda_helpers
import pytest
import torch
from cuda_helpers import (
    BACKEND,
    DEVICES,
    GPU_DTYPES,
    assert_close,
    check_parity,
    max_err,
    needs_extension,
    run_lora,
    run_series,
)

from llm_adapters import ops
from llm_adapters._numerics import ACTIVATIONS, activation_grad, apply_activation, dropout_threshold
from llm_adapters.ops import cuda_backend
from llm_adapters.ops._custom import lora_op, series_op

# the fixtures every cuda test file shares
ext = cuda_helpers.ext
dw_path = cuda_helpers.dw_path


# CPU: the same parity checks through the extension's CPU ops, which run the kernels' own code
# (csrc/kernels.cuh) on host threads with a barrier for __syncthreads. Small odd shapes cover
# the scalar and 16-byte vector paths, row/column tails, rank tiles 8..64 and beyond, split
# reductions and the fused dropout; what they cannot cover is GPU-only behaviour (warp timing,
# shared-memory banks, real 128-bit loads), which the `gpu` tests below check.


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_kernels_on_host_threads(ext, dtype, p):
    # k = 136: vector path in every dtype; k = 129: scalar path
    check_parity("lora", dtype, 37, 136, 67, 12, p, "identity", False, False, device="cpu")
    check_parity("lora", dtype, 19, 129, 40, 3, p, "identity", False, True, device="cpu")


@needs_extension
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_parallel_adapter_kernels_on_host_threads(ext, activation):
    check_parity("lora", torch.float16, 21, 72, 40, 20, 0.1, activation, True, True,
                  device="cpu")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_series_kernels_on_host_threads(ext, dtype, p):
    check_parity("series", dtype, 29, 100, 100, 8, p, "tanh", False, False, device="cpu")


@needs_extension
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_series_activations_on_host_threads(ext, activation):
    check_parity("series", torch.float16, 17, 64, 64, 24, 0.1, activation, True, True,
                  device="cpu")


@needs_extension
@pytest.mark.parametrize("kind,r", [("lora", 1), ("lora", 72), ("series", 72)])
def test_rank_tiles_on_host_threads(ext, kind, r):
    """r = 1 (the tallest tile) and r = 72 (two rank tiles, 64 + 8)."""
    check_parity(kind, torch.float32, 33, 40, 24, r, 0.1, "gelu", False, True, device="cpu")


@needs_extension
@pytest.mark.parametrize("kind", ["lora", "series"])
def test_many_blocks_on_host_threads(ext, kind):
    """Enough rows for several row blocks, so the shrink and row-reduce grids fill the
    emulated GPU without splitting (the unsplit path) and the expand has a row tail."""
    check_parity(kind, torch.float16, 600, 40, 136, 12, 0.1, "relu", False, True, device="cpu")



@needs_extension
@pytest.mark.parametrize(
    "dtype,m,n,r,p,activation",
    [
        (torch.float32, 70, 300, 130, 0.1, "silu"),  # 3 rank tiles (64, 64, 2), N tail of 32 / 128
        (torch.bfloat16, 65, 33, 1, 0.2, "tanh"),  # bottleneck 1, one row past a 64-row block
        (torch.float16, 3, 40, 1024, 0.1, "gelu"),  # the largest bottleneck: 16 rank tiles
    ],
)
def test_series_row_block_tiles_on_host_threads(ext, dw_path, dtype, m, n, r, p, activation):
    """The fused series row-block kernels beyond one rank tile and one column tile."""
    check_parity("series", dtype, m, n, n, r, p, activation, True, True, device="cpu")


@needs_extension
def test_series_widest_hidden_on_host_threads(ext):
    """Hidden 16384, the widest supported: 512 column steps of the shrink, 128 expand tiles;
    r = 5 in bfloat16 takes the one-pass partials for dUp."""
    assert cuda_backend._dw_from_partials(torch.empty(1, dtype=torch.bfloat16), 5)
    check_parity("series", torch.bfloat16, 2, 16384, 16384, 5, 0.1, "relu", True, True,
                  device="cpu")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_one_pass_backward_rank_tiles_on_host_threads(ext, dw_path, dtype):
    """grad_rows for LoRA: two rank tiles (72 = 64 + 8), several 64-row blocks of partials.
    The learned scale only below float32: its gradient is a sum of ~10⁴ terms of both signs,
    where float32 PyTorch's own error is a matter of luck (here 1.5e-6, while the previous
    two-pass kernels erred by 4e-5 and these by 3e-5 on a result of about 50); the per-row
    terms of d(scale) are checked against Σ|terms| in test_grad_rows_op_against_float64."""
    learned = dtype != torch.float32
    check_parity("lora", dtype, 131, 40, 97, 72, 0.1, "tanh", learned, True, device="cpu")


def _grad_rows_reference(g, w, s_pre, activation, s, dh_w, inv_keep, keep):
    """float64 reference of the grad_rows op's four outputs."""
    gd, sd = g.double(), s_pre.double()
    gw = gd @ w.double()
    ds = s * gw * activation_grad(sd, activation) if activation != "identity" else s * gw
    d_w = s * gd.t() @ apply_activation(sd, activation)
    row_terms = (gw * apply_activation(sd, activation)).sum(1)
    back = ds @ dh_w.double().t() * inv_keep
    dh = gd + (back if keep is None else torch.where(keep, back, 0.0))
    return ds, d_w, row_terms, dh


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_rows_op_against_float64_and_deterministic(ext, dtype, device):
    """The one-pass backward op on its own: dS, d_w (fixed-order sum of the 64-row blocks'
    partials), the per-row d(scale) terms and dh with dropout, each within float32 rounding of
    a float64 reference; two runs are bitwise identical (no atomics)."""
    dev = torch.device(device)
    torch.manual_seed(3)
    m, n, r, p, seed = (150, 77, 70, 0.2, 99) if device == "cpu" else (8192, 4096, 256, 0.1, 99)
    g = torch.randn(m, n, device=dev, dtype=dtype)
    w = torch.randn(n, r, device=dev) / r**0.5
    dh_w = torch.randn(n, r, device=dev) / n**0.5
    s_pre = torch.randn(m, r, device=dev)
    scale = torch.tensor([0.6], device=dev)
    t, inv = dropout_threshold(p)
    args = (g, w, s_pre, cuda_backend.ACTIVATION_CODES["gelu"], scale, 1.5, True, True, dh_w,
            inv, t, seed)
    first = ext.grad_rows(*args)
    second = ext.grad_rows(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    keep = BACKEND.keep_mask((m, n), p, seed, dev)
    refs = _grad_rows_reference(g, w, s_pre, "gelu", 0.9, dh_w, inv, keep)
    for name, got, ref in zip(["dS", "d_w", "row_terms", "dh"], first, refs):
        assert got.shape == ref.shape, name
        # float32 accumulation over n (or m) terms: a relative bound on the magnitudes summed
        mag = ref.abs().max().item() + 1.0
        tol = 1e-6 * mag * (n if name != "d_w" else m) ** 0.5
        if name == "dh":
            tol = tol + torch.finfo(dtype).eps * mag  # the result is rounded to g's dtype
        err = max_err(got, ref)
        assert err <= tol, f"grad_rows {name}: error {err:.3e} > {tol:.3e}"
    # without the optional outputs: same dS, nothing else computed
    ds, d_w, row_terms, dh = ext.grad_rows(g, w, s_pre, 3, scale, 1.5, False, False, None, 1.0,
                                           0, 0)
    assert torch.equal(ds, first[0])
    assert d_w.numel() == 0 and row_terms.numel() == 0 and dh.numel() == 0


def test_dw_path_rule(monkeypatch):
    """auto: one-pass partials while their buffer (r float32 per 64 rows) is no larger than g."""
    g16 = torch.empty(2, 3, dtype=torch.bfloat16)
    g32 = torch.empty(2, 3)
    assert cuda_backend._dw_from_partials(g16, 32) and not cuda_backend._dw_from_partials(g16, 33)
    assert cuda_backend._dw_from_partials(g32, 64) and not cuda_backend._dw_from_partials(g32, 65)
    monkeypatch.setattr(cuda_backend, "DW_PATH", "partials")
    assert cuda_backend._dw_from_partials(g16, 1024)
    monkeypatch.setattr(cuda_backend, "DW_PATH", "fast")
    with pytest.raises(ValueError, match="DW_PATH"):
        cuda_backend._dw_from_partials(g16, 8)


@needs_extension
def test_opcheck_on_host_threads(ext):
    """torch.library.opcheck of the custom ops wrapping this backend (schema, fake tensors,
    autograd registration, AOT dispatch), run on the extension's CPU ops."""
    m, k, n, r = 9, 24, 16, 3
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    a = torch.randn(r, k, requires_grad=True)
    b = torch.randn(n, r, requires_grad=True)
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(
        lora_op(BACKEND),
        (x, w, torch.randn(n, requires_grad=True), a, b, None, None, None, 2.0, 0.1, seed, "tanh"),
    )
    down = torch.randn(r, k, requires_grad=True)
    up = torch.randn(k, r, requires_grad=True)
    torch.library.opcheck(
        series_op(BACKEND),
        (x, down, up, None, None, torch.tensor(0.5, requires_grad=True), 1.0, 0.2, seed, "silu"),
    )


def _compiled_step_matches_eager(device, dtype, backend):
    """A LoRA layer feeding a series adapter, forward and backward, eager and under
    torch.compile(fullgraph=True): no graph break (the custom ops trace through their fakes)
    and identical results (the kernels are deterministic)."""
    dev = torch.device(device)
    m, k, n, r = 37, 136, 136, 12
    gen = torch.Generator(device="cpu").manual_seed(4)
    x = torch.randn(m, k, generator=gen).to(dev, dtype).requires_grad_()
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dev, dtype)
    a = (torch.randn(r, k, generator=gen) * k**-0.5).to(dev).requires_grad_()
    b = (torch.randn(n, r, generator=gen) * r**-0.5).to(dev).requires_grad_()
    down = (torch.randn(r, n, generator=gen) * n**-0.5).to(dev).requires_grad_()
    up = (torch.randn(n, r, generator=gen) * r**-0.5).to(dev).requires_grad_()
    seed = torch.tensor(7)

    def step(x, a, b, down, up):
        if dev.type == "cuda":
            y = ops.lora_linear(x, w, None, a, b, scaling=2.0, dropout_p=0.1, seed=7,
                                backend="cuda")
            z = ops.series_adapter(y, down, up, scaling=0.5, activation="relu", dropout_p=0.1,
                                   seed=8, backend="cuda")
        else:  # CPU tensors: the custom ops directly (see _run_lora)
            y = lora_op(BACKEND)(x, w, None, a, b, None, None, None, 2.0, 0.1, seed,
                                 "identity")[0]
            z = series_op(BACKEND)(y, down, up, None, None, None, 0.5, 0.1, seed + 1, "relu")[0]
        return z.float().square().sum()

    inputs = (x, a, b, down, up)
    eager = torch.autograd.grad(step(*inputs), inputs)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for name, g, e in zip(["x", "a", "b", "down", "up"], got, eager):
        assert torch.equal(g, e), f"d{name} differs between eager and compiled"


@needs_extension
def test_torch_compile_traces_the_ops_on_host_threads(ext):
    _compiled_step_matches_eager("cpu", torch.bfloat16, "aot_eager")



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_torch_compile_inductor_gpu(ext, dtype):
    _compiled_step_matches_eager("cuda", dtype, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "m,k,n,r",
    [(37, 129, 191, 1), (67, 257, 130, 12), (130, 200, 96, 24), (33, 136, 72, 72),
     (1024, 4096, 4096, 16), (512, 4096, 11008, 64)],
)
def test_lora_parity_gpu(ext, dtype, p, m, k, n, r):
    check_parity("lora", dtype, m, k, n, r, p, "identity", learned_scale=False, biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_parallel_adapter_parity_gpu(ext, dtype, activation):
    check_parity("lora", dtype, 77, 264, 136, 20, 0.1, activation, learned_scale=True,
                  biases=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("m,n,r", [(37, 129, 8), (66, 264, 64), (129, 100, 256),
                                   (2048, 4096, 64), (512, 4096, 256)])
def test_series_parity_gpu(ext, dtype, p, m, n, r):
    check_parity("series", dtype, m, n, n, r, p, "tanh", learned_scale=False, biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_series_activations_biases_learned_scale_gpu(ext, dtype, activation):
    check_parity("series", dtype, 45, 200, 200, 24, 0.1, activation, learned_scale=True,
                  biases=True)


@pytest.mark.gpu
def test_float32_lora_close_to_float64_gpu(ext):
    check_parity("lora", torch.float32, 61, 333, 97, 16, 0.1, "gelu", learned_scale=True,
                  biases=True)



@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_misaligned_rows_take_the_scalar_path(ext, dtype, device):
    """A storage offset that breaks 16-byte alignment gives the same S and expand result as
    aligned inputs (CPU: the kernel code on host threads)."""
    dev = torch.device(device)
    m, k, r = 70, 264, 12
    buf = torch.randn(m * k + 1, device=dev, dtype=dtype)
    x_mis = buf[1:].view(m, k)  # contiguous, 2 or 4 bytes off a 16-byte boundary
    x_al = x_mis.clone()
    a = torch.randn(r, k, device=dev)
    t, inv = dropout_threshold(0.3)
    s_mis = ext.shrink(x_mis, a, None, t, inv, 42)
    s_al = ext.shrink(x_al, a, None, t, inv, 42)
    torch.testing.assert_close(s_mis, s_al, rtol=1e-5, atol=1e-5)
    keep = BACKEND.keep_mask((m, k), 0.3, 42, dev)
    ref = (torch.where(keep, x_al.double(), 0.0) * inv) @ a.double().t()
    assert_close("shrink", s_al, (torch.where(keep, x_al, 0.0) * inv) @ a.to(dtype).t(), ref,
                  dtype)
    b = torch.randn(k, r, device=dev)
    y_mis = buf.clone()[1:].view(m, k)
    y_al = x_al.clone()
    ext.expand_add_(y_mis, None, s_al, 1, b, None, None, 0.5, 0, 0)
    ext.expand_add_(y_al, None, s_al, 1, b, None, None, 0.5, 0, 0)
    torch.testing.assert_close(y_mis, y_al, rtol=0, atol=0)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(ext, device):
    dev = torch.device(device)
    x = torch.randn(0, 64, device=dev, dtype=torch.float16, requires_grad=True)
    w = torch.randn(32, 64, device=dev, dtype=torch.float16)
    a = torch.randn(4, 64, device=dev, requires_grad=True)
    b = torch.randn(32, 4, device=dev, requires_grad=True)
    y = run_lora(x, w, None, a, b, 1.0, 0.1, "identity", 3, None, None)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0



@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_opcheck_lora_gpu(ext, p):
    dev = torch.device("cuda")
    m, k, n, r = 19, 40, 24, 5
    x = torch.randn(m, k, device=dev, requires_grad=True)
    w = torch.randn(n, k, device=dev)
    bias = torch.randn(n, device=dev, requires_grad=True)
    a = torch.randn(r, k, device=dev, requires_grad=True)
    b = torch.randn(n, r, device=dev, requires_grad=True)
    scale_t = torch.tensor(0.5, device=dev, requires_grad=True)
    seed = torch.tensor(7, dtype=torch.int64)
    for args in [
        (x, w, bias, a, b, None, None, None, 2.0, p, seed, "identity"),
        (x, w, None, a, b, torch.randn(r, device=dev, requires_grad=True),
         torch.randn(n, device=dev, requires_grad=True), scale_t, 1.0, p, seed, "silu"),
    ]:
        torch.library.opcheck(lora_op(BACKEND), args)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck_series_gpu(ext, p):
    dev = torch.device("cuda")
    m, n, r = 21, 48, 6
    h = torch.randn(m, n, device=dev, requires_grad=True)
    down = torch.randn(r, n, device=dev, requires_grad=True)
    up = torch.randn(n, r, device=dev, requires_grad=True)
    seed = torch.tensor(11, dtype=torch.int64)
    scale_t = torch.tensor(0.5, device=dev, requires_grad=True)
    for args in [
        (h, down, up, None, None, None, 1.0, p, seed, "tanh"),
        (h, down, up, torch.randn(r, device=dev, requires_grad=True),
         torch.randn(n, device=dev, requires_grad=True), scale_t, 1.0, p, seed, "gelu"),
    ]:
        torch.library.opcheck(series_op(BACKEND), args)


# LLaMA-7B shapes for the row-block kernels: 8192 tokens, hidden 4096, bottleneck / rank 256


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_series_row_block_llama_shape_gpu(ext, dw_path, dtype, p):
    check_parity("series", dtype, 8192, 4096, 4096, 256, p, "tanh", learned_scale=True,
                  biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_one_pass_backward_llama_shape_gpu(ext, dw_path, dtype, p):
    check_parity("lora", dtype, 8192, 4096, 4096, 256, p, "identity", learned_scale=False,
                  biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["lora", "series"])
def test_backward_is_deterministic_gpu(ext, dw_path, kind):
    """Fixed-order partial sums, no atomics: two backward passes give bitwise equal grads."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    m, n, r = 8192, 4096, 256
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(r, n, device=dev) / n**0.5).requires_grad_()
    b = (torch.randn(n, r, device=dev) / r**0.5).requires_grad_()
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    if kind == "lora":
        w = torch.randn(n, n, device=dev, dtype=torch.bfloat16) / n**0.5
        run = lambda: run_lora(x, w, None, a, b, 2.0, 0.1, "identity", 5, None, None)  # noqa: E731
    else:
        run = lambda: run_series(x, a, b, 1.0, 0.1, "tanh", 5, None, None)  # noqa: E731
    first = torch.autograd.grad(run(), [x, a, b], g)
    second = torch.autograd.grad(run(), [x, a, b], g)
    for one, two in zip(first, second):
        assert torch.equal(one, two)

