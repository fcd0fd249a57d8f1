"""The `cuda` backend's tensor-core kernels (16-bit activations) against float64.

The shrink, reduce_rows, grad_rows, expand and series forward on tile MMAs: CPU runs their tile
code with the host tile MMAs of csrc/mma.cuh standing in for WMMA; GPU (`pytest -m gpu`) runs
nvcuda::wmma. Each variant (tensor cores on and off) is checked against float64: within about
2x the same-dtype PyTorch error (DESIGN §6) and within the float32-operand error bound of the
hi / lo split, which a 16-bit rounding of an operand would break; and the whole ops pass parity
with either variant.
"""

from __future__ import annotations

import cuda_helpers
import pytest
import torch
from cuda_helpers import (
    BACKEND,
    GPU_DTYPES,
    assert_close,
    assert_within,
    check_parity,
    needs_extension,
)

from llm_adapters._numerics import activation_grad, apply_activation, dropout_threshold
from llm_adapters.ops import cuda_backend

# the fixtures every cuda test file shares
ext = cuda_helpers.ext
dw_path = cuda_helpers.dw_path


# ---------------------------------------------------------------------------------------------
# The tensor-core shrink and reduce_rows (16-bit x): CPU runs their tile code with the host
# tile MMAs of csrc/mma.cuh; GPU runs nvcuda::wmma. Both are compared with float64 and with the
# CUDA-core kernels.
# ---------------------------------------------------------------------------------------------


def _shrink_case(dtype, m, k, r, p, w_scale, out_scale, device, seed=11, bias=False):
    """Inputs, the float64 reference and the same-dtype PyTorch S of one shrink call."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(m * 7919 + k * 31 + r)
    x = torch.randn(m, k, generator=gen).to(dtype).to(dev)
    w = (torch.randn(r, k, generator=gen) * w_scale).to(dev)
    b = torch.randn(r, generator=gen).to(dev) if bias else None
    t, inv = dropout_threshold(p) if p > 0 else (0, 1.0)
    keep = BACKEND.keep_mask((m, k), p, seed, dev) if p > 0 else None
    xd = x.double() if keep is None else torch.where(keep, x.double(), 0.0)
    ref = (xd * inv) @ w.double().t() * out_scale
    xs = x if keep is None else torch.where(keep, x, 0.0)
    same = ((xs * inv) @ w.to(dtype).t()).float() * out_scale
    # the worst-case error of float32 accumulation with w carried to 2^-16 of itself (the
    # hi / lo split): a w rounded to x's dtype alone (error up to 2^-9 |w|) does not fit it
    absdot = (xd.abs() * inv) @ w.double().abs().t() * abs(out_scale)
    split_bound = (2.0**-15 + k * 2.0**-24) * absdot
    if bias:
        ref = ref + b.double()
        same = same + b
    return x, w, b, t, inv, seed, ref, same, split_bound


def _check_shrink(ext, dtype, m, k, r, p, w_scale=None, out_scale=1.0, device="cpu",
                  bias=False):
    w_scale = k**-0.5 if w_scale is None else w_scale
    x, w, b, t, inv, seed, ref, same, split_bound = _shrink_case(
        dtype, m, k, r, p, w_scale, out_scale, device, bias=bias)
    tag = f"shrink {dtype} m={m} k={k} r={r} p={p} w~{w_scale:.0e}"
    out = {}
    for tc in (True, False):
        s = ext.shrink(x, w, b, t, inv * out_scale, seed, tc)
        assert s.dtype == torch.float32 and s.shape == (m, r)
        assert_within(f"{tag} tensor_cores={tc}", s, same, ref, split_bound, dtype,
                       "float32-weight")
        out[tc] = s
    return out


# (m, k, r, p): rows 1 / 37 / 300 (one and two 256-row blocks), k not a multiple of 16 / 32
# (k = 40, 136), not a multiple of the 8-element vector (129, 4: the scalar path), rank tiles
# of 16 / 32 / 64 and two rank blocks (100 = 64 + 36), dropout on and off, split K (the
# emulation pretends 2 SMs: few blocks split K)
_TC_CASES = [
    (1, 40, 1, 0.0),
    (37, 136, 12, 0.1),
    (37, 4, 16, 0.0),
    (300, 129, 100, 0.0),
    (70, 264, 24, 0.3),
    (19, 1000, 40, 0.0),
    (2, 520, 64, 0.2),
]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,r,p", _TC_CASES)
def test_tensor_core_shrink_on_host_threads(ext, dtype, m, k, r, p):
    """Both shrink variants against float64: within 2x the PyTorch error and within the
    float32-weight bound (the hi / lo split of w)."""
    _check_shrink(ext, dtype, m, k, r, p, out_scale=1.25, bias=(m == 37))


@needs_extension
@pytest.mark.parametrize("w_scale", [1e-2, 1e-4, 1e-6])
def test_tensor_core_shrink_small_float16_weights(ext, w_scale):
    """float16 has a narrow exponent: LoRA weights of 1e-4 .. 1e-6 would lose their low part
    (or all of it) without the block's power-of-two pre-scaling of w."""
    _check_shrink(ext, torch.float16, 37, 136, 16, 0.1, w_scale=w_scale)


@needs_extension
def test_tensor_core_shrink_split_k_is_deterministic(ext):
    """Split-K partials summed in a fixed order: repeated calls are bitwise equal."""
    x, w, _, t, inv, seed, *_ = _shrink_case(torch.bfloat16, 5, 1000, 16, 0.1, 0.03, 1.0, "cpu")
    first = ext.shrink(x, w, None, t, inv, seed, True)
    assert torch.equal(first, ext.shrink(x, w, None, t, inv, seed, True))


def test_tensor_core_switch_reads_the_environment():
    assert cuda_backend.tensor_cores_from_env({}) is True
    assert cuda_backend.tensor_cores_from_env({"LLM_ADAPTERS_CUDA_TENSOR_CORES": "0"}) is False
    assert cuda_backend.tensor_cores_from_env({"LLM_ADAPTERS_CUDA_TENSOR_CORES": "1"}) is True
    assert cuda_backend.tensor_cores_from_env({"LLM_ADAPTERS_CUDA_TENSOR_CORES": " 0 "}) is False


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_forward_honours_the_tensor_core_switch(ext, monkeypatch, dtype):
    """TENSOR_CORES reaches the shrink: S differs between the variants (different summation)
    and both are within the parity bound; the whole LoRA op passes parity with either."""
    x, w, _, t, inv, seed, ref, same, _ = _shrink_case(dtype, 37, 136, 12, 0.0, 0.1, 1.0, "cpu")
    weight = torch.randn(9, 136).to(dtype)
    b = torch.randn(9, 12)
    s_pre = {}
    for tc in (True, False):
        monkeypatch.setattr(cuda_backend, "TENSOR_CORES", tc)
        _, s_pre[tc], _ = BACKEND.lora_forward(x, weight, None, w, b, None, None, None, 1.0, 0.0,
                                               seed, "identity")
        assert_close(f"lora s_pre tensor_cores={tc}", s_pre[tc], same, ref, dtype)
        check_parity("lora", dtype, 19, 129, 40, 3, 0.1, "identity", False, True, device="cpu")
    assert not torch.equal(s_pre[True], s_pre[False])


def _check_reduce_rows(ext, dtype, m, n, r, p, activation, h_scale=1.0, device="cpu"):
    """Both reduce_rows variants against float64: within 2x the PyTorch error and within the
    float32-operand bound (φ(H) split into hi + lo parts)."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(m * 131 + n * 7 + r)
    x = torch.randn(m, n, generator=gen).to(dtype).to(dev)
    h = (torch.randn(m, r, generator=gen) * h_scale).to(dev)
    act = cuda_backend.ACTIVATION_CODES[activation]
    t = dropout_threshold(p)[0] if p > 0 else 0
    keep = BACKEND.keep_mask((m, n), p, 9, dev) if p > 0 else None
    xd = x.double() if keep is None else torch.where(keep, x.double(), 0.0)
    phi = apply_activation(h.double(), activation)
    ref = xd.t() @ phi
    xs = x if keep is None else torch.where(keep, x, 0.0)
    same = (xs.t() @ apply_activation(h, activation).to(dtype)).float()
    bound = (2.0**-15 + m * 2.0**-24) * (xd.abs().t() @ phi.abs())
    tag = f"reduce_rows {dtype} m={m} n={n} r={r} p={p} {activation} h~{h_scale:.0e}"
    out = {}
    for tc in (True, False):
        got = ext.reduce_rows(x, h, act, t, 9, tc)
        assert got.dtype == torch.float32 and got.shape == (n, r)
        assert_within(f"{tag} tensor_cores={tc}", got, same, ref, bound, dtype)
        out[tc] = got
    return out


# (m, n, r, p, activation, scale of H): columns 40 / 136 / 264 (one and two 256-column blocks)
# and 129 (the scalar path), rows 1 .. 700 (split M on the emulation's 2 SMs), rank tiles of
# 16 / 32 / 64 and two rank blocks (100), dropout, every φ, small and large dS for float16
_TC_REDUCE_CASES = [
    (1, 40, 1, 0.0, "identity", 1.0),
    (37, 136, 12, 0.1, "tanh", 1.0),
    (300, 129, 100, 0.0, "identity", 1e-3),
    (70, 264, 24, 0.3, "silu", 1e-5),
    (700, 20, 16, 0.0, "relu", 30.0),
    (19, 1000, 64, 0.2, "gelu", 1.0),
]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,p,activation,h_scale", _TC_REDUCE_CASES)
def test_tensor_core_reduce_rows_on_host_threads(ext, dtype, m, n, r, p, activation, h_scale):
    _check_reduce_rows(ext, dtype, m, n, r, p, activation, h_scale)


@needs_extension
@pytest.mark.parametrize("kind", ["lora", "series"])
def test_backward_with_cuda_core_kernels_on_host_threads(ext, monkeypatch, kind):
    """LLM_ADAPTERS_CUDA_TENSOR_CORES=0: forward and every gradient through the CUDA-core
    shrink / reduce_rows (the other parity tests run the tensor-core ones for 16-bit x)."""
    monkeypatch.setattr(cuda_backend, "TENSOR_CORES", False)
    check_parity(kind, torch.bfloat16, 37, 136, 67, 12, 0.1, "tanh", True, True, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,h_scale", _TC_REDUCE_CASES)
def test_tensor_core_reduce_rows_gpu(ext, dtype, m, n, r, p, activation, h_scale):
    _check_reduce_rows(ext, dtype, m, n, r, p, activation, h_scale, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m,r", [(2048, 16), (8192, 64)])
def test_tensor_core_reduce_rows_llama_shape_gpu(ext, dtype, p, m, r):
    """dA at N = 4096: against float64, close to the CUDA-core variant, deterministic."""
    out = _check_reduce_rows(ext, dtype, m, 4096, r, p, "identity", 1e-3, device="cuda")
    rel = (out[True] - out[False]).abs().max() / out[False].abs().max()
    assert rel.item() < 1e-3  # both are within the float32-operand bound of float64 already
    torch.manual_seed(0)
    x = torch.randn(m, 4096, device="cuda").to(dtype)
    h = torch.randn(m, r, device="cuda")
    first = ext.reduce_rows(x, h, 0, 100, 3, True)
    assert torch.equal(first, ext.reduce_rows(x, h, 0, 100, 3, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,k,r,p", _TC_CASES)
def test_tensor_core_shrink_gpu(ext, dtype, m, k, r, p):
    _check_shrink(ext, dtype, m, k, r, p, out_scale=1.25, device="cuda", bias=(m == 37))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m,r", [(2048, 16), (16384, 16), (2048, 64), (513, 100)])
def test_tensor_core_shrink_llama_shape_gpu(ext, dtype, p, m, r):
    """K = 4096: against float64, against the CUDA-core shrink, deterministic."""
    out = _check_shrink(ext, dtype, m, 4096, r, p, device="cuda")
    x, w, _, t, inv, seed, _, _, split_bound = _shrink_case(dtype, m, 4096, r, p, 4096**-0.5,
                                                            1.0, "cuda")
    assert ((out[True].double() - out[False].double()).abs() <= 2 * split_bound).all()
    assert torch.equal(out[True], ext.shrink(x, w, None, t, inv, seed, True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_lora_parity_both_shrink_variants_gpu(ext, monkeypatch, dtype):
    """The LoRA op end to end (forward and every gradient) with either shrink."""
    for tc in (True, False):
        monkeypatch.setattr(cuda_backend, "TENSOR_CORES", tc)
        check_parity("lora", dtype, 2048, 4096, 4096, 16, 0.1, "identity", False, True)


# ---------------------------------------------------------------------------------------------
# The tensor-core grad_rows (16-bit g): G = g·w and the d_w partials gᵀφ(S) on the tile MMAs,
# the rest in float32 as the CUDA-core kernel. Both variants against float64.
# ---------------------------------------------------------------------------------------------


def _check_grad_rows(ext, dtype, m, n, r, p, activation, need_dw=True, need_row_terms=True,
                     learned=False, dh=False, w_scale=None, s_scale=1.0, device="cpu"):
    """Both grad_rows variants against float64: dS, d_w, the row terms and dh each within 2x
    the same-dtype PyTorch error and within the float32-operand bound of the hi / lo split
    (2^-15 relative, plus float32 accumulation); two runs bitwise equal. Returns {tc: outputs}."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(m * 523 + n * 17 + r)
    g = torch.randn(m, n, generator=gen).to(dtype).to(dev)
    w = (torch.randn(n, r, generator=gen) * (n**-0.5 if w_scale is None else w_scale)).to(dev)
    s_pre = (torch.randn(m, r, generator=gen) * s_scale).to(dev)
    dh_w = (torch.randn(n, r, generator=gen) * n**-0.5).to(dev) if dh else None
    scale = torch.tensor([0.7], device=dev) if learned else None
    scaling = 1.5
    s = scaling * (0.7 if learned else 1.0)
    t, inv = dropout_threshold(p) if (dh and p > 0) else (0, 1.0)
    keep = BACKEND.keep_mask((m, n), p, 5, dev) if (dh and p > 0) else None
    act = cuda_backend.ACTIVATION_CODES[activation]

    gd, sd = g.double(), s_pre.double()
    phi = apply_activation(sd, activation)
    # (activation_grad gives None for the identity)
    dphi = torch.ones_like(sd) if activation == "identity" else activation_grad(sd, activation)
    dphi32 = dphi.float() if activation == "identity" else activation_grad(s_pre, activation)
    gw = gd @ w.double()
    refs = {"dS": s * gw * dphi, "d_w": s * gd.t() @ phi, "row_terms": (gw * phi).sum(1)}
    abs_gw = gd.abs() @ w.double().abs()
    rel_n, rel_m = 2.0**-15 + (n + r) * 2.0**-24, 2.0**-15 + m * 2.0**-24
    # φ' is evaluated in float32: an absolute 2^-20 on values of order one
    bounds = {"dS": abs(s) * abs_gw * (dphi.abs() * rel_n + 2.0**-20),
              "d_w": abs(s) * rel_m * (gd.abs().t() @ phi.abs()),
              "row_terms": rel_n * (abs_gw * phi.abs()).sum(1)}
    gw_same = (g @ w.to(dtype)).float()
    phi32 = apply_activation(s_pre, activation)
    same = {"dS": s * gw_same * dphi32,
            "d_w": s * (g.t() @ phi32.to(dtype)).float(),
            "row_terms": (gw_same * phi32).sum(1)}
    if dh:
        back = refs["dS"] @ dh_w.double().t() * inv
        refs["dh"] = gd + (back if keep is None else torch.where(keep, back, 0.0))
        back_same = (same["dS"] @ dh_w.t() * inv)
        same["dh"] = (g.float() + (back_same if keep is None else torch.where(keep, back_same, 0.0))
                      ).to(dtype)
        # rounding to g's dtype, plus dS's bound carried through dh_w
        bounds["dh"] = (torch.finfo(dtype).eps * refs["dh"].abs()
                        + 2 * inv * bounds["dS"] @ dh_w.double().abs().t()
                        + 2.0**-22 * (refs["dS"].abs() @ dh_w.double().abs().t()))
    names = ["dS", "d_w", "row_terms", "dh"]
    tag = (f"grad_rows {dtype} m={m} n={n} r={r} p={p} {activation} dw={need_dw} "
           f"rows={need_row_terms} learned={learned} dh={dh}")
    out = {}
    for tc in (True, False):
        args = (g, w, s_pre, act, scale, scaling, need_dw,
                need_row_terms, dh_w, inv, t, 5, tc)
        got = ext.grad_rows(*args)
        for a, b in zip(got, ext.grad_rows(*args)):
            assert torch.equal(a, b), f"{tag} tensor_cores={tc}: not deterministic"
        wanted = {"dS": True, "d_w": need_dw, "row_terms": need_row_terms, "dh": dh}
        for name, value in zip(names, got):
            if not wanted[name]:
                assert value.numel() == 0, f"{tag}: {name} computed though not asked for"
                continue
            assert value.shape == refs[name].shape, f"{tag}: {name} shape"
            assert_within(f"{tag} tensor_cores={tc} {name}", value, same[name], refs[name],
                           bounds[name], dtype)
        out[tc] = got
    return out


# (m, n, r, p, activation, need_dw, need_row_terms, learned scale, dh): rows 1 .. 300 (one to
# five 64-row blocks, a partial last one), columns 40 / 136 / 264 and 129 / 77 / 20 (not a
# multiple of the 8-element vector: the scalar path), rank tiles of 16 / 32 / 64 and two rank
# passes (100 = 64 + 36), every φ, the optional outputs on and off, dh with and without dropout
_TC_GRAD_ROWS_CASES = [
    (1, 40, 1, 0.0, "identity", True, True, True, False),
    (37, 136, 12, 0.1, "tanh", True, False, False, True),
    (70, 129, 24, 0.0, "silu", False, True, True, False),
    (300, 264, 100, 0.0, "gelu", True, True, False, False),
    (37, 20, 16, 0.2, "relu", False, False, True, True),
    (70, 77, 40, 0.0, "gelu", True, True, True, False),
    (37, 64, 64, 0.1, "silu", True, False, False, True),
]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,p,activation,need_dw,need_rows,learned,dh", _TC_GRAD_ROWS_CASES)
def test_tensor_core_grad_rows_on_host_threads(ext, dtype, m, n, r, p, activation, need_dw,
                                               need_rows, learned, dh):
    _check_grad_rows(ext, dtype, m, n, r, p, activation, need_dw, need_rows, learned, dh)


@needs_extension
@pytest.mark.parametrize("w_scale,s_scale", [(1e-4, 1.0), (1e-6, 1e-3), (1e-2, 1e-5)])
def test_tensor_core_grad_rows_small_float16_operands(ext, w_scale, s_scale):
    """float16: small weights and small φ(S) keep their low parts through the block's
    power-of-two pre-scaling of w and of φ(S)."""
    _check_grad_rows(ext, torch.float16, 70, 136, 24, 0.0, "identity", w_scale=w_scale,
                     s_scale=s_scale)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lora", "series"])
def test_backward_with_tensor_core_grad_rows_on_host_threads(ext, dw_path, dtype, kind):
    """The whole op (forward and every gradient) through grad_rows with the tensor cores on and
    off: both pass parity against float64, through either source of dB / dUp."""
    for tc in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cuda_backend, "TENSOR_CORES", tc)
            check_parity(kind, dtype, 70, 136, 77, 24, 0.1, "tanh", True, True, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,need_dw,need_rows,learned,dh", _TC_GRAD_ROWS_CASES)
def test_tensor_core_grad_rows_gpu(ext, dtype, m, n, r, p, activation, need_dw, need_rows,
                                   learned, dh):
    _check_grad_rows(ext, dtype, m, n, r, p, activation, need_dw, need_rows, learned, dh,
                     device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("r", [16, 64])
@pytest.mark.parametrize("dh", [False, True])
def test_tensor_core_grad_rows_llama_shape_gpu(ext, dtype, r, dh):
    """M 2048, N 4096: both variants against float64 (inside _check_grad_rows, which also checks
    determinism), and the two variants within twice the float32-operand bound of each other."""
    out = _check_grad_rows(ext, dtype, 2048, 4096, r, 0.1, "gelu", True, True, True, dh,
                           device="cuda")
    for name, a, b in zip(["dS", "d_w", "row_terms", "dh"], out[True], out[False]):
        if a.numel() == 0:
            continue
        scale = b.double().abs().max().item() + 1e-30
        rel = (a.double() - b.double()).abs().max().item() / scale
        limit = torch.finfo(dtype).eps if name == "dh" else 1e-3
        assert rel <= limit, f"grad_rows {name}: variants differ by {rel:.2e} of the max"


# ---------------------------------------------------------------------------------------------
# The tensor-core expand (16-bit out) and series forward (16-bit h): φ(H) wᵀ with both float32
# operands split into hi + lo parts (three tile MMAs), the series' D(h) Dnᵀ as grad_rows' G.
# Both variants against float64, with a bound that a 16-bit rounding of either operand fails:
# in "cancel" cases `in` is minus the rounded product, so out is the small rounding residue and
# its error is measured against the product's magnitude, not the output's.
# ---------------------------------------------------------------------------------------------


def _check_expand(ext, dtype, m, n, r, p, activation, h_scale=1.0, w_scale=None, cancel=False,
                  bias=False, learned=False, inplace=False, device="cpu"):
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(m * 613 + n * 19 + r)
    h = (torch.randn(m, r, generator=gen) * h_scale).to(dev)
    w = (torch.randn(n, r, generator=gen) * (r**-0.5 if w_scale is None else w_scale)).to(dev)
    b = torch.randn(n, generator=gen).to(dev) if bias else None
    scale = torch.tensor([0.7], device=dev) if learned else None
    scaling = 1.25
    s = scaling * (0.7 if learned else 1.0)
    t = dropout_threshold(p)[0] if p > 0 else 0
    keep = BACKEND.keep_mask((m, n), p, 21, dev) if p > 0 else None
    act = cuda_backend.ACTIVATION_CODES[activation]
    phi = apply_activation(h.double(), activation)
    prod = s * phi @ w.double().t()
    absprod = abs(s) * phi.abs() @ w.double().abs().t()
    if keep is not None:
        prod, absprod = torch.where(keep, prod, 0.0), torch.where(keep, absprod, 0.0)
    if cancel:
        base = (-prod).to(dtype)
    else:
        base = torch.randn(m, n, generator=gen).to(dtype).to(dev)
    ref = base.double() + prod + (b.double() if bias else 0.0)
    same_prod = (s * (apply_activation(h, activation).to(dtype) @ w.to(dtype).t())).float()
    if keep is not None:
        same_prod = torch.where(keep, same_prod, 0.0)
    same = (base.float() + same_prod + (b if bias else 0.0)).to(dtype)
    # the result's rounding to dtype (relative, or the subnormal spacing), float32 adds, and the
    # product carried to 2^-15 of |φ(H)| |w| (hi / lo split of both operands) plus float32
    # accumulation over r
    info = torch.finfo(dtype)
    bound = (info.eps * ref.abs() + info.eps * info.tiny
             + 2.0**-23 * (base.double().abs() + ref.abs())
             + (2.0**-15 + (r + 2) * 2.0**-24) * absprod)
    tag = (f"expand {dtype} m={m} n={n} r={r} p={p} {activation} h~{h_scale:.0e} "
           f"cancel={cancel} bias={bias} learned={learned} inplace={inplace}")
    out = {}
    for tc in (True, False):
        y = base.clone() if inplace else torch.full_like(base, float("nan"))
        ext.expand_add_(y, None if inplace else base, h, act, w, b, scale, scaling, t, 21, tc)
        assert_within(f"{tag} tensor_cores={tc}", y, None if cancel else same, ref, bound,
                       dtype)
        y2 = base.clone() if inplace else torch.empty_like(base)
        ext.expand_add_(y2, None if inplace else base, h, act, w, b, scale, scaling, t, 21, tc)
        assert torch.equal(y, y2), f"{tag} tensor_cores={tc}: not deterministic"
        out[tc] = y
    return out


# (m, n, r, p, activation, h_scale, w_scale, cancel, bias, learned, inplace): rows 1 .. 130 (up
# to three 64-row tiles, a partial last one), columns 40 / 136 / 264 and 129 / 20 (not a
# multiple of the 8-element vector: the scalar epilogue), ranks 1 .. 256 (one to eight steps of
# 32, partial steps), every φ, dropout, bias, learned scale, in place, and float16 operands
# below its normal range (w ~ 1e-5, φ(H) ~ 1e-4) with a product inside it
_TC_EXPAND_CASES = [
    (1, 40, 1, 0.0, "identity", 1.0, None, False, True, False, False),
    (37, 136, 12, 0.1, "tanh", 1.0, None, True, False, True, False),
    (70, 129, 40, 0.0, "silu", 1.0, None, True, True, False, True),
    (130, 264, 100, 0.2, "gelu", 1.0, None, True, False, False, False),
    (64, 20, 16, 0.0, "relu", 3.0, None, False, False, True, True),
    (19, 300, 256, 0.0, "identity", 1.0, None, True, False, False, False),
    (37, 136, 24, 0.0, "identity", 1e3, 1e-5, True, False, False, False),
    (37, 136, 24, 0.0, "tanh", 1e-4, 30.0, True, False, False, False),
]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,p,activation,h_scale,w_scale,cancel,bias,learned,inplace",
                         _TC_EXPAND_CASES)
def test_tensor_core_expand_on_host_threads(ext, dtype, m, n, r, p, activation, h_scale,
                                            w_scale, cancel, bias, learned, inplace):
    _check_expand(ext, dtype, m, n, r, p, activation, h_scale, w_scale, cancel, bias, learned,
                  inplace)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,h_scale,w_scale,cancel,bias,learned,inplace",
                         _TC_EXPAND_CASES)
def test_tensor_core_expand_gpu(ext, dtype, m, n, r, p, activation, h_scale, w_scale, cancel,
                                bias, learned, inplace):
    _check_expand(ext, dtype, m, n, r, p, activation, h_scale, w_scale, cancel, bias, learned,
                  inplace, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,r,cancel", [(2048, 16, False), (16384, 16, True), (4096, 256, True)])
def test_tensor_core_expand_llama_shape_gpu(ext, dtype, m, r, cancel):
    """N = 4096: the LoRA expand (r 16) and a series bottleneck of 256, both variants."""
    _check_expand(ext, dtype, m, 4096, r, 0.0, "identity", cancel=cancel, inplace=True,
                  device="cuda")


def _check_series_forward(ext, dtype, m, n, r, p, activation, biases=True, learned=False,
                          device="cpu"):
    """Both series_forward variants: s_pre within the float32-operand bound of float64, z within
    2x the PyTorch error and the bound of its product; deterministic."""
    dev = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(m * 389 + n * 23 + r)
    h = torch.randn(m, n, generator=gen).to(dtype).to(dev)
    down_t = (torch.randn(n, r, generator=gen) * n**-0.5).to(dev)
    up = (torch.randn(n, r, generator=gen) * r**-0.5).to(dev)
    d_b = torch.randn(r, generator=gen).to(dev) if biases else None
    u_b = torch.randn(n, generator=gen).to(dev) if biases else None
    scale = torch.tensor([0.7], device=dev) if learned else None
    scaling = 1.5
    s = scaling * (0.7 if learned else 1.0)
    t, inv = dropout_threshold(p) if p > 0 else (0, 1.0)
    keep = BACKEND.keep_mask((m, n), p, 33, dev) if p > 0 else None
    act = cuda_backend.ACTIVATION_CODES[activation]
    hd = h.double() if keep is None else torch.where(keep, h.double(), 0.0)
    s_ref = hd @ down_t.double() * inv + (d_b.double() if biases else 0.0)
    s_bound = (2.0**-15 + n * 2.0**-24) * inv * (hd.abs() @ down_t.double().abs())
    phi = apply_activation(s_ref, activation)
    z_ref = h.double() + s * phi @ up.double().t() + (u_b.double() if biases else 0.0)
    hs = h if keep is None else torch.where(keep, h, 0.0)
    s_same = (hs * inv) @ down_t.to(dtype) + (d_b.to(dtype) if biases else 0.0)
    z_same = (h + s * apply_activation(s_same, activation) @ up.to(dtype).t()
              + (u_b.to(dtype) if biases else 0.0))
    tag = f"series_forward {dtype} m={m} n={n} r={r} p={p} {activation} learned={learned}"
    for tc in (True, False):
        args = (h, down_t, up, d_b, u_b, scale, scaling, act, t, inv, 33, tc)
        z, s_pre = ext.series_forward(*args)
        z2, s_pre2 = ext.series_forward(*args)
        assert torch.equal(z, z2) and torch.equal(s_pre, s_pre2), f"{tag}: not deterministic"
        assert z.dtype == dtype and s_pre.dtype == torch.float32
        assert_within(f"{tag} tensor_cores={tc} s_pre", s_pre, s_same.float(), s_ref, s_bound,
                       dtype)
        assert_close(f"{tag} tensor_cores={tc} z", z, z_same, z_ref, dtype)


# (m, n, r, p, activation, biases, learned): bottlenecks 1 .. 256 (one to four rank passes of
# 64), hidden 40 .. 300 and 129 / 77 (the scalar path), dropout of h, every φ
_TC_SERIES_CASES = [
    (1, 40, 1, 0.0, "identity", True, False),
    (37, 136, 12, 0.1, "tanh", True, True),
    (70, 129, 64, 0.0, "silu", False, False),
    (130, 264, 100, 0.2, "gelu", True, False),
    (19, 77, 256, 0.1, "relu", True, True),
]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,r,p,activation,biases,learned", _TC_SERIES_CASES)
def test_tensor_core_series_forward_on_host_threads(ext, dtype, m, n, r, p, activation, biases,
                                                    learned):
    _check_series_forward(ext, dtype, m, n, r, p, activation, biases, learned)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,biases,learned",
                         _TC_SERIES_CASES + [(2048, 4096, 256, 0.1, "relu", True, False)])
def test_tensor_core_series_forward_gpu(ext, dtype, m, n, r, p, activation, biases, learned):
    _check_series_forward(ext, dtype, m, n, r, p, activation, biases, learned, device="cuda")

