"""The `cuda` backend (csrc/, llm_adapters._C).

CPU: the extension compiles and loads (JIT build, or the prebuilt llm_adapters._C), its status
is reported honestly, CPU tensors are refused with a clear error, the Philox keep-mask the
kernels use (compiled for the host from the same csrc/philox.cuh) is bit-identical to the
Triton kernels' mask under TRITON_INTERPRET=1, and the kernels themselves (csrc/kernels.cuh,
run on host threads by the extension's CPU ops) pass the float64 parity checks and opcheck:
among them the fused series row-block kernels (bottleneck 1..1024, hidden up to 16384) and the
one-pass backward over g (grad_rows), through both sources of dB / dUp (DW_PATH), and the
tensor-core shrink / reduce_rows / grad_rows of 16-bit x (csrc/mma.cuh's host tile MMAs standing
in for WMMA), each variant against float64 and the float32-operand error bound of the hi / lo split.
GPU (`pytest -m gpu`): output and every gradient against a float64 reference at odd and LLaMA
shapes in float16 / bfloat16 (error at most about 2x the same-dtype PyTorch error), dropout on
and off, masks identical to the Triton backend's, and torch.library.opcheck of the custom ops.
"""

from __future__ import annotations

import os

import pytest
import torch

from llm_adapters import ops
from llm_adapters._numerics import ACTIVATIONS, activation_grad, apply_activation, dropout_threshold
from llm_adapters.ops import cuda_backend
from llm_adapters.ops._custom import lora_op, series_op

BACKEND = cuda_backend.BACKEND
_prebuilt_ok = cuda_backend.extension_status()[0]
_jit_reason = cuda_backend._cuda_build.jit_unavailable_reason()
needs_extension = pytest.mark.skipif(
    not _prebuilt_ok and _jit_reason is not None,
    reason=f"the CUDA extension is not built and cannot be JIT-built here: {_jit_reason}",
)
_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def ext():
    """torch.ops.llm_adapters_C, built on first use. Without a GPU the JIT build targets sm_90
    only (LLM_ADAPTERS_CUDA_ARCHS, unless set), the same as csrc/build_check.sh, so a build
    folder it left (LLM_ADAPTERS_CUDA_BUILD_DIR) is reused instead of compiling again."""
    with pytest.MonkeyPatch.context() as mp:
        if not torch.cuda.is_available() and not os.environ.get("LLM_ADAPTERS_CUDA_ARCHS"):
            mp.setenv("LLM_ADAPTERS_CUDA_ARCHS", "9.0")
        return cuda_backend.load_extension()


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
        assert ("JIT-built on first use" in reason) == (_jit_reason is None)


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


_MASK_CASES = [
    ((37, 129), 0.1, 0),
    ((5, 1000), 0.5, 2**40 + 12345),  # seed with a non-zero high word
    ((64, 333), 0.25, 2**62 - 7),
    ((3, 7), 0.9, 2**32 - 1),
    ((9, 11), 0.3, 2**31),
    ((1, 1), 0.0, 5),
    ((17, 8), 1e-6, 77),  # p below 1/65536: threshold 0, everything kept
]


@needs_extension
@pytest.mark.parametrize("shape,p,seed", _MASK_CASES)
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


# ---------------------------------------------------------------------------------------------
# GPU: parity against float64, every gradient; masks; opcheck
# ---------------------------------------------------------------------------------------------


def _max_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    return (t.double() - ref).abs().max().item() if t.numel() else 0.0


def _assert_close(name, ours, same_dtype, ref, dtype):
    """ours may differ from the float64 reference by at most about 2x what the same
    computation in PyTorch at `dtype` does (plus one unit in the last place of the output's
    scale, so an exact PyTorch result does not demand an exact kernel)."""
    err = _max_err(ours, ref)
    base = _max_err(same_dtype, ref)
    ulp = torch.finfo(dtype).eps * max(ref.abs().max().item(), 1e-30)
    bound = 2.0 * base + ulp
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs the float64 reference exceeds {bound:.3e} "
        f"(PyTorch {dtype} error {base:.3e})"
    )


def _assert_within(name, ours, same_dtype, ref, bound, dtype, operand="float32-operand"):
    """_assert_close against the float64 reference (skipped when same_dtype is None), and the
    error within `bound` everywhere: the bound of float32-accurate operands, which rounding an
    operand to 16 bits would break."""
    if same_dtype is not None:
        _assert_close(name, ours, same_dtype, ref, dtype)
    excess = ((ours.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"{name}: beyond the {operand} bound by {excess}"


def _lora_reference(x, w, bias, a, b, a_bias, b_bias, scale, keep, inv_keep, activation):
    """Eager y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b in x's dtype (weights cast to it)."""
    dt = x.dtype
    xd = x if keep is None else torch.where(keep, x, 0.0) * inv_keep
    s = xd @ a.to(dt).t()
    if a_bias is not None:
        s = s + a_bias.to(dt)
    y = x @ w.to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    y = y + (apply_activation(s, activation) * scale.to(dt) if torch.is_tensor(scale)
             else apply_activation(s, activation) * scale) @ b.to(dt).t()
    if b_bias is not None:
        y = y + b_bias.to(dt)
    return y


def _series_reference(h, down, up, d_bias, u_bias, scale, keep, inv_keep, activation):
    dt = h.dtype
    hd = h if keep is None else torch.where(keep, h, 0.0) * inv_keep
    s = hd @ down.to(dt).t()
    if d_bias is not None:
        s = s + d_bias.to(dt)
    act = apply_activation(s, activation)
    act = act * (scale.to(dt) if torch.is_tensor(scale) else scale)
    z = h + act @ up.to(dt).t()
    if u_bias is not None:
        z = z + u_bias.to(dt)
    return z


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)
            for t in tensors]


def _grads(out, inputs, g):
    want = [t for t in inputs if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, want, g)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def _run_lora(x, w, bias, a, b, scale, p, activation, seed, a_bias, b_bias):
    if x.is_cuda:  # the public op, as users call it
        return ops.lora_linear(x, w, bias, a, b, scaling=scale, dropout_p=p,
                               activation=activation, seed=seed, lora_a_bias=a_bias,
                               lora_b_bias=b_bias, backend="cuda")
    # CPU tensors: ops.lora_linear refuses them for backend="cuda", so call the custom op the
    # way it does; the extension's CPU ops run the kernel code on host threads
    scale_t, scale_f = (scale.reshape(()), 1.0) if torch.is_tensor(scale) else (None, scale)
    return lora_op(BACKEND)(x, w, bias, a, b, a_bias, b_bias, scale_t, scale_f, p,
                            torch.tensor(seed), activation)[0]


def _run_series(h, down, up, scale, p, activation, seed, d_bias, u_bias):
    if h.is_cuda:
        return ops.series_adapter(h, down, up, scaling=scale, activation=activation,
                                  dropout_p=p, seed=seed, down_bias=d_bias, up_bias=u_bias,
                                  backend="cuda")
    scale_t, scale_f = (scale.reshape(()), 1.0) if torch.is_tensor(scale) else (None, scale)
    return series_op(BACKEND)(h, down, up, d_bias, u_bias, scale_t, scale_f, p,
                              torch.tensor(seed), activation)[0]


def _check_parity(kind, dtype, m, k, n, r, p, activation, learned_scale, biases, seed=1234,
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
        y = _run_lora(x, w, bias, a, b, scale, p, activation, seed, a_bias, b_bias)
        inputs = [x, bias, a, b, a_bias, b_bias] + ([scale] if learned_scale else [])
        keep = BACKEND.keep_mask((m, k), p, seed, dev) if p > 0 else None
        ref_fn = lambda xs, dt: _lora_reference(  # noqa: E731
            xs[0], w.to(dt), xs[1], xs[2], xs[3], xs[4], xs[5],
            xs[6] if learned_scale else scale, keep, dropout_threshold(p)[1], activation)
    else:
        n = k
        down = (torch.randn(r, k, device=dev) / k**0.5).requires_grad_()
        up = (torch.randn(k, r, device=dev) / r**0.5).requires_grad_()
        d_bias = torch.randn(r, device=dev, requires_grad=True) if biases else None
        u_bias = torch.randn(k, device=dev, requires_grad=True) if biases else None
        y = _run_series(x, down, up, scale, p, activation, seed, d_bias, u_bias)
        inputs = [x, down, up, d_bias, u_bias] + ([scale] if learned_scale else [])
        keep = BACKEND.keep_mask((m, k), p, seed, dev) if p > 0 else None
        ref_fn = lambda xs, dt: _series_reference(  # noqa: E731
            xs[0], xs[1], xs[2], xs[3], xs[4], xs[5] if learned_scale else scale, keep,
            dropout_threshold(p)[1], activation)
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
    _assert_close(f"{tag} output", y, same_out, ref_out.detach(), dtype)
    names = ["dx", "dbias", "dA", "dB", "da_bias", "db_bias", "dscale"] if kind == "lora" else \
        ["dh", "dDown", "dUp", "ddown_bias", "dup_bias", "dscale"]
    for name, got, same, ref in zip(names, ours, same_grads, ref_grads):
        if ref is None:
            continue
        assert got is not None and got.shape == ref.shape, name
        _assert_close(f"{tag} {name}", got, same, ref, dtype)


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
    _check_parity("lora", dtype, 37, 136, 67, 12, p, "identity", False, False, device="cpu")
    _check_parity("lora", dtype, 19, 129, 40, 3, p, "identity", False, True, device="cpu")


@needs_extension
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_parallel_adapter_kernels_on_host_threads(ext, activation):
    _check_parity("lora", torch.float16, 21, 72, 40, 20, 0.1, activation, True, True,
                  device="cpu")


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_series_kernels_on_host_threads(ext, dtype, p):
    _check_parity("series", dtype, 29, 100, 100, 8, p, "tanh", False, False, device="cpu")


@needs_extension
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_series_activations_on_host_threads(ext, activation):
    _check_parity("series", torch.float16, 17, 64, 64, 24, 0.1, activation, True, True,
                  device="cpu")


@needs_extension
@pytest.mark.parametrize("kind,r", [("lora", 1), ("lora", 72), ("series", 72)])
def test_rank_tiles_on_host_threads(ext, kind, r):
    """r = 1 (the tallest tile) and r = 72 (two rank tiles, 64 + 8)."""
    _check_parity(kind, torch.float32, 33, 40, 24, r, 0.1, "gelu", False, True, device="cpu")


@needs_extension
@pytest.mark.parametrize("kind", ["lora", "series"])
def test_many_blocks_on_host_threads(ext, kind):
    """Enough rows for several row blocks, so the shrink and row-reduce grids fill the
    emulated GPU without splitting (the unsplit path) and the expand has a row tail."""
    _check_parity(kind, torch.float16, 600, 40, 136, 12, 0.1, "relu", False, True, device="cpu")


@pytest.fixture(params=["partials", "reduce"])
def dw_path(request, monkeypatch):
    """Both sources of dB / dUp: the one-pass partials of grad_rows and reduce_rows."""
    monkeypatch.setattr(cuda_backend, "DW_PATH", request.param)
    return request.param


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
    _check_parity("series", dtype, m, n, n, r, p, activation, True, True, device="cpu")


@needs_extension
def test_series_widest_hidden_on_host_threads(ext):
    """Hidden 16384, the widest supported: 512 column steps of the shrink, 128 expand tiles;
    r = 5 in bfloat16 takes the one-pass partials for dUp."""
    assert cuda_backend._dw_from_partials(torch.empty(1, dtype=torch.bfloat16), 5)
    _check_parity("series", torch.bfloat16, 2, 16384, 16384, 5, 0.1, "relu", True, True,
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
    _check_parity("lora", dtype, 131, 40, 97, 72, 0.1, "tanh", learned, True, device="cpu")


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
@pytest.mark.parametrize("device", _DEVICES)
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
        err = _max_err(got, ref)
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


_GPU_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
def test_torch_compile_inductor_gpu(ext, dtype):
    _compiled_step_matches_eager("cuda", dtype, "inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize(
    "m,k,n,r",
    [(37, 129, 191, 1), (67, 257, 130, 12), (130, 200, 96, 24), (33, 136, 72, 72),
     (1024, 4096, 4096, 16), (512, 4096, 11008, 64)],
)
def test_lora_parity_gpu(ext, dtype, p, m, k, n, r):
    _check_parity("lora", dtype, m, k, n, r, p, "identity", learned_scale=False, biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_parallel_adapter_parity_gpu(ext, dtype, activation):
    _check_parity("lora", dtype, 77, 264, 136, 20, 0.1, activation, learned_scale=True,
                  biases=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("m,n,r", [(37, 129, 8), (66, 264, 64), (129, 100, 256),
                                   (2048, 4096, 64), (512, 4096, 256)])
def test_series_parity_gpu(ext, dtype, p, m, n, r):
    _check_parity("series", dtype, m, n, n, r, p, "tanh", learned_scale=False, biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_series_activations_biases_learned_scale_gpu(ext, dtype, activation):
    _check_parity("series", dtype, 45, 200, 200, 24, 0.1, activation, learned_scale=True,
                  biases=True)


@pytest.mark.gpu
def test_float32_lora_close_to_float64_gpu(ext):
    _check_parity("lora", torch.float32, 61, 333, 97, 16, 0.1, "gelu", learned_scale=True,
                  biases=True)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,p,seed", _MASK_CASES + [((4096, 4096), 0.1, 2**61 + 99)])
def test_keep_mask_identical_to_triton_backend_gpu(ext, shape, p, seed):
    from llm_adapters.ops import triton_backend

    dev = torch.device("cuda")
    ours = BACKEND.keep_mask(shape, p, seed, dev)
    ref = triton_backend.BACKEND.keep_mask(shape, p, seed, dev)
    assert torch.equal(ours, ref)
    assert torch.equal(ours.cpu(), BACKEND.keep_mask(shape, p, seed, torch.device("cpu")))


@needs_extension
@pytest.mark.parametrize("device", _DEVICES)
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
    _assert_close("shrink", s_al, (torch.where(keep, x_al, 0.0) * inv) @ a.to(dtype).t(), ref,
                  dtype)
    b = torch.randn(k, r, device=dev)
    y_mis = buf.clone()[1:].view(m, k)
    y_al = x_al.clone()
    ext.expand_add_(y_mis, None, s_al, 1, b, None, None, 0.5, 0, 0)
    ext.expand_add_(y_al, None, s_al, 1, b, None, None, 0.5, 0, 0)
    torch.testing.assert_close(y_mis, y_al, rtol=0, atol=0)


@needs_extension
@pytest.mark.parametrize("device", _DEVICES)
def test_empty_batch(ext, device):
    dev = torch.device(device)
    x = torch.randn(0, 64, device=dev, dtype=torch.float16, requires_grad=True)
    w = torch.randn(32, 64, device=dev, dtype=torch.float16)
    a = torch.randn(4, 64, device=dev, requires_grad=True)
    b = torch.randn(32, 4, device=dev, requires_grad=True)
    y = _run_lora(x, w, None, a, b, 1.0, 0.1, "identity", 3, None, None)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


@needs_extension
@pytest.mark.parametrize("device", _DEVICES)
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
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_series_row_block_llama_shape_gpu(ext, dw_path, dtype, p):
    _check_parity("series", dtype, 8192, 4096, 4096, 256, p, "tanh", learned_scale=True,
                  biases=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_one_pass_backward_llama_shape_gpu(ext, dw_path, dtype, p):
    _check_parity("lora", dtype, 8192, 4096, 4096, 256, p, "identity", learned_scale=False,
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
        run = lambda: _run_lora(x, w, None, a, b, 2.0, 0.1, "identity", 5, None, None)  # noqa: E731
    else:
        run = lambda: _run_series(x, a, b, 1.0, 0.1, "tanh", 5, None, None)  # noqa: E731
    first = torch.autograd.grad(run(), [x, a, b], g)
    second = torch.autograd.grad(run(), [x, a, b], g)
    for one, two in zip(first, second):
        assert torch.equal(one, two)


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
        _assert_within(f"{tag} tensor_cores={tc}", s, same, ref, split_bound, dtype,
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
        _assert_close(f"lora s_pre tensor_cores={tc}", s_pre[tc], same, ref, dtype)
        _check_parity("lora", dtype, 19, 129, 40, 3, 0.1, "identity", False, True, device="cpu")
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
        _assert_within(f"{tag} tensor_cores={tc}", got, same, ref, bound, dtype)
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
    _check_parity(kind, torch.bfloat16, 37, 136, 67, 12, 0.1, "tanh", True, True, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,h_scale", _TC_REDUCE_CASES)
def test_tensor_core_reduce_rows_gpu(ext, dtype, m, n, r, p, activation, h_scale):
    _check_reduce_rows(ext, dtype, m, n, r, p, activation, h_scale, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
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
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("m,k,r,p", _TC_CASES)
def test_tensor_core_shrink_gpu(ext, dtype, m, k, r, p):
    _check_shrink(ext, dtype, m, k, r, p, out_scale=1.25, device="cuda", bias=(m == 37))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
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
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
def test_lora_parity_both_shrink_variants_gpu(ext, monkeypatch, dtype):
    """The LoRA op end to end (forward and every gradient) with either shrink."""
    for tc in (True, False):
        monkeypatch.setattr(cuda_backend, "TENSOR_CORES", tc)
        _check_parity("lora", dtype, 2048, 4096, 4096, 16, 0.1, "identity", False, True)


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
            _assert_within(f"{tag} tensor_cores={tc} {name}", value, same[name], refs[name],
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
            _check_parity(kind, dtype, 70, 136, 77, 24, 0.1, "tanh", True, True, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,need_dw,need_rows,learned,dh", _TC_GRAD_ROWS_CASES)
def test_tensor_core_grad_rows_gpu(ext, dtype, m, n, r, p, activation, need_dw, need_rows,
                                   learned, dh):
    _check_grad_rows(ext, dtype, m, n, r, p, activation, need_dw, need_rows, learned, dh,
                     device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
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
        _assert_within(f"{tag} tensor_cores={tc}", y, None if cancel else same, ref, bound,
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
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,h_scale,w_scale,cancel,bias,learned,inplace",
                         _TC_EXPAND_CASES)
def test_tensor_core_expand_gpu(ext, dtype, m, n, r, p, activation, h_scale, w_scale, cancel,
                                bias, learned, inplace):
    _check_expand(ext, dtype, m, n, r, p, activation, h_scale, w_scale, cancel, bias, learned,
                  inplace, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
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
        _assert_within(f"{tag} tensor_cores={tc} s_pre", s_pre, s_same.float(), s_ref, s_bound,
                       dtype)
        _assert_close(f"{tag} tensor_cores={tc} z", z, z_same, z_ref, dtype)


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
@pytest.mark.parametrize("dtype", _GPU_DTYPES)
@pytest.mark.parametrize("m,n,r,p,activation,biases,learned",
                         _TC_SERIES_CASES + [(2048, 4096, 256, 0.1, "relu", True, False)])
def test_tensor_core_series_forward_gpu(ext, dtype, m, n, r, p, activation, biases, learned):
    _check_series_forward(ext, dtype, m, n, r, p, activation, biases, learned, device="cuda")
