"""The `triton` backend of ops.lora_linear (LoRA and parallel adapters) against float64.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) in
fp32 and fp16; bf16 `tl.dot` is wrong under the interpreter, so bf16 runs in the GPU tests.
Parity rule (DESIGN §6): the kernel's error against a float64 reference is at most about twice
the error of the same computation done by PyTorch in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
import triton

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops._custom import lora_op
from llm_adapters.ops._dispatch import resolve_backend

BACKEND = "triton"
_NAMES = ("x", "bias", "lora_a", "lora_b", "lora_a_bias", "lora_b_bias", "scale")


def _device() -> str:
    # CPU under the interpreter; on a GPU machine the same tests run the compiled kernels.
    return "cuda" if torch.cuda.is_available() else "cpu"


DEV = _device()


# ---------------------------------------------------------------------------------------------
# references and helpers
# ---------------------------------------------------------------------------------------------


def _reference(x, w, bias, a, b, ab, bb, scale, act, keep, p):
    """The shared reference in x's dtype (small weights cast to it, as the op does)."""
    return parity.lora_reference(x, w, bias, a, b, scaling=scale, activation=act, keep=keep,
                                 inv_keep=dropout_threshold(p)[1], lora_a_bias=ab,
                                 lora_b_bias=bb)


def _make(m, k, n, r, dtype, *, bias=True, branch_bias=True, learned=True, wdtype=torch.float32,
          device=None, lead=()):
    """Inputs with the magnitudes of a real layer (unit x, W and A ~ 1/sqrt(fan_in))."""
    device = device or _device()
    x = torch.randn(*lead, m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    t = {
        "x": x,
        "bias": (torch.randn(n, device=device) * 0.1).to(dtype) if bias else None,
        "lora_a": torch.randn(r, k, device=device, dtype=wdtype) / k**0.5,
        "lora_b": torch.randn(n, r, device=device, dtype=wdtype) / r**0.5,
        "lora_a_bias": torch.randn(r, device=device, dtype=wdtype) * 0.1 if branch_bias else None,
        "lora_b_bias": torch.randn(n, device=device, dtype=wdtype) * 0.1 if branch_bias else None,
        "scale": torch.tensor(0.7, device=device, dtype=wdtype) if learned else 1.3,
    }
    return w, t


def _leaves(t, dtype=None, x_grad=True):
    out = {}
    for name, v in t.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if dtype is not None:
                v = v.to(dtype)
            v.requires_grad_(x_grad or name != "x")
        out[name] = v
    return out


def _grads(y, leaves, g):
    y.backward(g)
    return {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}


def _run_op(w, t, act, p, seed, x_grad=True, backend=BACKEND):
    lv = _leaves(t, x_grad=x_grad)
    y = ops.lora_linear(
        lv["x"], w, lv["bias"], lv["lora_a"], lv["lora_b"], scaling=lv["scale"], dropout_p=p,
        activation=act, seed=seed, lora_a_bias=lv["lora_a_bias"], lora_b_bias=lv["lora_b_bias"],
        backend=backend,
    )
    return y, lv


def _run_ref(w, t, act, p, keep, dtype, ref_dtype=torch.float64, x_grad=True):
    lv = _leaves(t, dtype=None if dtype is None else ref_dtype, x_grad=x_grad)
    if dtype is None:  # same-dtype PyTorch computation: leaves keep their own dtypes
        wr = w
    else:
        wr = w.to(ref_dtype)
    x2 = lv["x"].reshape(-1, lv["x"].shape[-1])
    y = _reference(
        x2, wr, lv["bias"], lv["lora_a"], lv["lora_b"], lv["lora_a_bias"], lv["lora_b_bias"],
        lv["scale"], act, keep, p,
    )
    return y.reshape(*lv["x"].shape[:-1], -1), lv


def _assert_parity(name, ours, ref, same, dtype, magnitude=None):
    """DESIGN §6 (parity.assert_parity) with this file's floor: four float32 roundings of the
    largest value, and ours in same's dtype.

    A single number gets a floor of one rounding in the computation dtype of `magnitude`, the
    sum of the absolute values of the terms it adds up (default 8 |ref|): one same-dtype sample
    of a scalar can land on the reference by luck of the quantisation grid, so its error alone
    measures nothing, and d(scale) = Σ (gB) ⊙ φ(S) cancels heavily (|ref| << Σ |terms|)."""
    if ref.numel() == 1:
        rel_floor = torch.finfo(dtype).eps
        magnitude = 8 * ref.abs().item() if magnitude is None else magnitude
    else:
        rel_floor, magnitude = 4 * torch.finfo(torch.float32).eps, None
    parity.assert_parity(name, ours, ref, same, rel_floor=rel_floor, magnitude=magnitude,
                         check_dtype=True)


def _check_case(m, k, n, r, dtype, act, p, seed=1234, lead=(), x_grad=True, w_transposed=False,
                ref_dtype=torch.float64, **kw):
    w, t = _make(m, k, n, r, dtype, lead=lead, **kw)
    if w_transposed:  # GPT-2 Conv1D stores [K, N]; the op sees its transposed view
        w = w.t().contiguous().t()
        assert not w.is_contiguous()
    m_rows = t["x"].numel() // k
    keep = ops.dropout_mask((m_rows, k), p, seed, t["x"].device, backend=BACKEND) if p else None
    g = torch.randn(*lead, m, n, device=t["x"].device).to(dtype)
    y, lv = _run_op(w, t, act, p, seed, x_grad=x_grad)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    ours = _grads(y, lv, g)
    y_ref, lv_ref = _run_ref(w, t, act, p, keep, dtype=ref_dtype, ref_dtype=ref_dtype,
                             x_grad=x_grad)
    refs = _grads(y_ref, lv_ref, g.to(ref_dtype))
    y_same, lv_same = _run_ref(w, t, act, p, keep, dtype=None, x_grad=x_grad)
    sames = _grads(y_same, lv_same, g)
    _assert_parity("y", y.detach(), y_ref.detach(), y_same.detach(), dtype)
    mags = parity.lora_scalar_magnitudes(lv_ref, g, activation=act, keep=keep,
                                         inv_keep=dropout_threshold(p)[1])
    for name in _NAMES:
        if lv[name] is None or not isinstance(lv[name], torch.Tensor):
            continue
        if name == "x" and not x_grad:
            assert ours["x"] is None
            continue
        mag = mags.get(name) if refs[name].numel() == 1 else None
        _assert_parity(f"d{name}", ours[name], refs[name], sames[name], dtype, mag)
    return y.detach()


# ---------------------------------------------------------------------------------------------
# CPU (interpreter) tests: fp32 and fp16
# ---------------------------------------------------------------------------------------------

_CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", _CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "m,k,n,r,act,p",
    [
        (1, 33, 19, 1, "identity", 0.0),
        (37, 50, 45, 12, "tanh", 0.1),
        (300, 70, 41, 24, "identity", 0.3),
        (37, 40, 72, 64, "silu", 0.0),
    ],
    ids=["M1-r1", "M37-r12", "M300-r24", "M37-r64"],
)
def test_shapes(m, k, n, r, act, p, dtype):
    _check_case(m, k, n, r, dtype, act, p)


@pytest.mark.parametrize("dtype", _CPU_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("act", ["identity", "tanh", "relu", "gelu", "silu"])
def test_activations_with_dropout(act, dtype):
    _check_case(37, 50, 45, 12, dtype, act, 0.2)


def test_rank_over_one_chunk():
    # r > 128: the shrink and the reductions run over several rank chunks (grid dim)
    _check_case(21, 40, 30, 200, torch.float32, "gelu", 0.1)


@pytest.mark.parametrize("dtype", _CPU_DTYPES, ids=["fp32", "fp16"])
def test_float_scaling_no_biases_half_adapter(dtype):
    # float scaling (no learned scale), no biases at all, adapter weights in x's dtype
    _check_case(37, 50, 45, 12, dtype, "identity", 0.0, bias=False, branch_bias=False,
                learned=False, wdtype=dtype)


def test_x_without_grad():
    _check_case(37, 50, 45, 12, torch.float32, "tanh", 0.2, x_grad=False)


class _Spy:
    """Stands in for a Triton kernel object: records each launch, then runs the kernel."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_needs_skip_dx(monkeypatch):
    # x.requires_grad False: the dx GEMM is not launched at all
    from llm_adapters.triton_kernels import lora as kernels

    launched = []
    real = kernels._dx_kernel

    monkeypatch.setattr(kernels, "_dx_kernel", _Spy(real, launched))
    w, t = _make(37, 50, 45, 12, torch.float32)
    y, lv = _run_op(w, t, "identity", 0.0, 0, x_grad=False)
    y.sum().backward()
    assert not launched and lv["x"].grad is None and lv["lora_a"].grad is not None
    y, lv = _run_op(w, t, "identity", 0.0, 0, x_grad=True)
    y.sum().backward()
    assert launched and lv["x"].grad is not None


def test_three_dim_x():
    _check_case(19, 50, 45, 12, torch.float32, "relu", 0.2, lead=(2,))


@pytest.mark.parametrize("dtype", _CPU_DTYPES, ids=["fp32", "fp16"])
def test_transposed_weight(dtype):
    _check_case(37, 50, 45, 12, dtype, "identity", 0.1, w_transposed=True)


def test_non_contiguous_x():
    # Through the op (which flattens), and straight into the kernels with a strided x.
    from llm_adapters.triton_kernels import lora as kernels

    w, t = _make(37, 50, 45, 12, torch.float32)
    wide = torch.randn(37, 100, device=DEV)
    x = wide[:, ::2]
    assert not x.is_contiguous()
    args = (w, None, t["lora_a"], t["lora_b"], None, None, None, 0.5, 0.2, 77, "tanh")
    y, s, _ = kernels.lora_forward(x, *args)
    y2, s2, _ = kernels.lora_forward(x.contiguous(), *args)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(s, s2, rtol=0, atol=0)
    xg = x.clone().requires_grad_()
    y3 = ops.lora_linear(xg, w, None, t["lora_a"], t["lora_b"], scaling=0.5, dropout_p=0.2,
                         activation="tanh", seed=77, backend=BACKEND)
    torch.testing.assert_close(y3.detach(), y, rtol=0, atol=0)


def test_dropout_mask_is_the_philox_mask():
    """Same seed -> same mask in forward and backward, equal to ops.dropout_mask(triton)."""
    from llm_adapters.triton_kernels import lora as kernels

    m, k, n, r, p, seed = 37, 50, 45, 12, 0.3, 2**40 + 5
    w, t = _make(m, k, n, r, torch.float32, branch_bias=False)
    x, a = t["x"], t["lora_a"]
    keep = ops.dropout_mask((m, k), p, seed, DEV, backend=BACKEND)
    _, inv = dropout_threshold(p)
    assert 0.6 < keep.float().mean().item() < 0.8
    y, s_pre, mask = kernels.lora_forward(x, w, None, a, t["lora_b"], None, None, None, 1.0,
                                          p, seed, "identity")
    assert mask.numel() == 0 and mask.dtype == torch.bool  # never stored
    assert s_pre.dtype == torch.float32 and s_pre.shape == (m, r)
    s_ref = (x.double() * keep * inv) @ a.double().t()
    torch.testing.assert_close(s_pre.double(), s_ref, rtol=1e-5, atol=1e-5)
    # Backward regenerates it. Probe: W = 0, B's first row all ones and g = e_0 in every row
    # give dS = 1 everywhere, so dA = 1ᵀ D(x) and dx = D'(1 A) expose the mask directly.
    b1 = torch.zeros(n, r, device=DEV)
    b1[0, :] = 1.0
    g1 = torch.zeros(m, n, device=DEV)
    g1[:, 0] = 1.0
    w0 = torch.zeros_like(w)
    grads = kernels.lora_backward(g1, x, w0, a, b1, None, 1.0, p, seed, "identity",
                                  s_pre, mask, [True, False, True, False, False, False, False])
    dx_ref = (torch.ones(m, r, dtype=torch.float64, device=DEV) @ a.double()) * keep * inv
    da_ref = torch.ones(r, m, dtype=torch.float64, device=DEV) @ (x.double() * keep * inv)
    torch.testing.assert_close(grads[0].double(), dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[2].double(), da_ref, rtol=1e-5, atol=1e-5)
    # Same seed, same output; another seed, another mask.
    y2, _, _ = kernels.lora_forward(x, w, None, a, t["lora_b"], None, None, None, 1.0, p, seed,
                                    "identity")
    y3, _, _ = kernels.lora_forward(x, w, None, a, t["lora_b"], None, None, None, 1.0, p,
                                    seed + 1, "identity")
    assert torch.equal(y, y2) and not torch.equal(y, y3)


def test_float64_falls_back_with_the_same_mask():
    # float64 runs in PyTorch on this backend, but with the Philox mask: gradcheck it.
    m, k, n, r, p, seed = 7, 9, 6, 3, 0.3, 11
    w, t = _make(m, k, n, r, torch.float64, wdtype=torch.float64)
    lv = _leaves(t)
    args = [lv[name] for name in _NAMES]

    def fn(x, bias, a, b, ab, bb, scale):
        return ops.lora_linear(x, w, bias, a, b, scaling=scale, dropout_p=p, activation="tanh",
                               seed=seed, lora_a_bias=ab, lora_b_bias=bb, backend=BACKEND)

    assert torch.autograd.gradcheck(fn, args)
    keep = ops.dropout_mask((m, k), p, seed, DEV, backend=BACKEND)
    y_ref = _reference(lv["x"], w, *(lv[nm] for nm in _NAMES[1:]), "tanh", keep, p)
    torch.testing.assert_close(fn(*args), y_ref)


def test_errors():
    from llm_adapters.triton_kernels import lora as kernels

    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="2-D"):
        kernels.lora_forward(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2),
                             None, None, None, 1.0, 0.0, 0, "identity")
    with pytest.raises(TypeError, match="weight dtype"):
        kernels.lora_forward(x[0], torch.randn(4, 8).half(), None, torch.randn(2, 8),
                             torch.randn(4, 2), None, None, None, 1.0, 0.0, 0, "identity")


def test_opcheck():
    impl = resolve_backend("lora", torch.device(DEV), BACKEND)
    op = lora_op(impl)
    w, t = _make(21, 40, 30, 12, torch.float32)
    seed = torch.tensor(5, dtype=torch.int64)
    lv = _leaves(t)
    full = (lv["x"], w, lv["bias"], lv["lora_a"], lv["lora_b"], lv["lora_a_bias"],
            lv["lora_b_bias"], lv["scale"], 1.0, 0.2, seed, "gelu")
    torch.library.opcheck(op, full)
    lv2 = _leaves(t, x_grad=False)
    bare = (lv2["x"], w, None, lv2["lora_a"], lv2["lora_b"], None, None, None, 0.5, 0.0, seed,
            "identity")
    torch.library.opcheck(op, bare)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    # Inductor with fullgraph=True: the custom op must trace without graph breaks (about 8 s
    # on CPU under the interpreter, most of it Inductor's own compile).
    w, t = _make(9, 20, 12, 4, torch.float32)
    lv = _leaves(t)

    def f(x, a, b, scale):
        y = ops.lora_linear(x, w, None, a, b, scaling=scale, dropout_p=0.1, activation="silu",
                            seed=3, backend=BACKEND)
        return (y * y).sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(lv["x"], lv["lora_a"], lv["lora_b"], lv["scale"])
    loss.backward()
    lv_e = _leaves(t)
    loss_e = f(lv_e["x"], lv_e["lora_a"], lv_e["lora_b"], lv_e["scale"])
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    for name in ("x", "lora_a", "lora_b", "scale"):
        torch.testing.assert_close(lv[name].grad, lv_e[name].grad)


def test_tiny_llama_lora_all_linears(monkeypatch):
    """A tiny LLaMA with LoRA on every linear: the same loss and adapter gradients on backend
    triton as on torch (both fp32), each within the parity rule of a float64 torch run."""
    import copy

    from tiny_models import tiny_batch, tiny_model

    import llm_adapters as la

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = la.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(0)
    model = la.get_adapter_model(tiny_model("llama"), cfg).to(DEV).train()
    batch = {k: v.to(DEV) for k, v in tiny_batch().items()}

    def run(m, backend):
        monkeypatch.setenv("LLM_ADAPTERS_BACKEND", backend)
        m.zero_grad(set_to_none=True)
        loss = m(**batch).loss
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss_ref, grads_ref = run(copy.deepcopy(model).double(), "torch")
    loss_torch, grads_torch = run(copy.deepcopy(model), "torch")
    from llm_adapters.triton_kernels import lora as kernels

    launches = []
    monkeypatch.setattr(kernels, "_main_kernel", _Spy(kernels._main_kernel, launches))
    loss_ours, grads_ours = run(copy.deepcopy(model), BACKEND)
    assert len(launches) == 2 * len(targets)  # every adapted linear ran the Triton GEMM
    assert len(grads_ours) == 2 * 2 * len(targets)  # A and B per target, two layers
    assert all("lora_" in n for n in grads_ours)
    _assert_parity("loss", loss_ours, loss_ref, loss_torch, torch.float32)
    for name, ref in grads_ref.items():
        _assert_parity(name, grads_ours[name], ref, grads_torch[name], torch.float32)


# ---------------------------------------------------------------------------------------------
# GPU tests: LLaMA shapes, bf16 / fp16 (compiled kernels, autotuned configs)
# ---------------------------------------------------------------------------------------------

_GPU_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("act,p", [("identity", 0.0), ("identity", 0.1), ("tanh", 0.05)])
def test_gpu_llama_7b_shape(dtype, act, p):
    # M = 8192 tokens, K = N = 4096, r = 16: the DESIGN §7 target shape.
    _check_case(8192, 4096, 4096, 16, dtype, act, p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", _GPU_DTYPES, ids=["bf16", "fp16"])
def test_gpu_odd_shapes(dtype):
    # ragged tails on every dimension, a rank that is not a power of two, a Conv1D weight view
    _check_case(1, 4096, 4096, 16, dtype, "identity", 0.0)
    _check_case(1000, 1000, 3000, 24, dtype, "gelu", 0.1, w_transposed=True)
    _check_case(777, 2048, 1536, 200, dtype, "silu", 0.1, lead=(3,))


@pytest.mark.gpu
def test_gpu_fp32_ieee():
    # fp32 GEMMs keep fp32 products (torch's allow_tf32 is off by default)
    assert not torch.backends.cuda.matmul.allow_tf32
    _check_case(1000, 1024, 1536, 64, torch.float32, "relu", 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(4096, 14336), (14336, 4096)], ids=["up", "down"])
def test_gpu_largest_llama_shapes(k, n):
    # M = 16384 tokens against the 8B MLP projections; dropout offsets reach M·K = 2.3e8.
    # The reference is float32 here (float64 at this size costs more than the test is worth).
    _check_case(16384, k, n, 16, torch.bfloat16, "identity", 0.1, ref_dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_matches_torch_backend_without_dropout():
    # Both backends on the same GPU tensors: the same numbers up to accumulation order.
    w, t = _make(4096, 4096, 4096, 16, torch.bfloat16)
    g = torch.randn(4096, 4096, device=DEV).to(torch.bfloat16)
    y_t, lv_t = _run_op(w, t, "identity", 0.0, 0, backend="torch")
    gr_t = _grads(y_t, lv_t, g)
    y_o, lv_o = _run_op(w, t, "identity", 0.0, 0)
    gr_o = _grads(y_o, lv_o, g)
    y_ref, lv_ref = _run_ref(w, t, "identity", 0.0, None, dtype=torch.float64)
    gr_ref = _grads(y_ref, lv_ref, g.double())
    _assert_parity("y", y_o.detach(), y_ref.detach(), y_t.detach(), torch.bfloat16)
    for name in _NAMES:
        _assert_parity(f"d{name}", gr_o[name], gr_ref[name], gr_t[name], torch.bfloat16)


def test_fp32_config_pruning():
    # IEEE fp32 products run on FMA: configs past 64 fp32 words per thread of accumulators and
    # operand tiles are not launched (AOT compiles of them spilled up to 28 KB per thread), unless
    # none is within 64, then the fewest; tensor-core variants keep every config but the tf32
    # reduce's wide one.
    from types import SimpleNamespace

    from llm_adapters.triton_kernels import _limits
    from llm_adapters.triton_kernels import lora as kernels

    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4)
    ieee, tc = {"IEEE": True, "BLOCK_R": 16}, {"IEEE": False, "BLOCK_R": 16}
    # acc [64, 64] + x [64, 32] + W [32, 64] = 8192 words over 128 threads
    assert kernels._fma_registers("_main_kernel", small, ieee) == 64
    assert kernels._fma_registers("_main_kernel", big, ieee) == 192
    assert kernels._fma_registers("_main_kernel", big, tc) == 0

    def pick(configs, nargs, kernel="_main_kernel"):
        return _limits.fewest_registers(
            configs, lambda c: kernels._fma_registers(kernel, c, nargs)
        )

    assert pick([big, small], ieee) == [small]
    assert pick([big, small], tc) == [big, small]
    # r = 128 in the shrink: no config is within 64 words, the fewest is kept (not all)
    shrink = kernels._shrink_configs(False)
    kept = pick(shrink, {"IEEE": True, "BLOCK_R": 128}, "_shrink_kernel")
    assert kept and len(kept) < len(shrink)
    words = [kernels._fma_registers("_shrink_kernel", c, {"IEEE": True, "BLOCK_R": 128})
             for c in shrink]
    assert min(words) > 64 and all(
        kernels._fma_registers("_shrink_kernel", c, {"IEEE": True, "BLOCK_R": 128}) == min(words)
        for c in kept
    )
    # every lora kernel keeps a config in IEEE fp32 at every rank block the launchers use
    gemm, reduce_ = kernels._gemm_configs(False), kernels._reduce_configs(False)
    for br in (16, 64, 128):
        for kernel, configs, extra in [
            ("_main_kernel", gemm, {}), ("_dx_kernel", gemm, {"HAS_BASE": True}),
            ("_shrink_kernel", shrink, {}),
            ("_reduce_kernel", reduce_, {"DO_ROW": True, "DO_COL": True}),
        ]:
            assert pick(configs, {"IEEE": True, "BLOCK_R": br, **extra}, kernel), (kernel, br)
    # the FMA-only GEMM tile: never with tensor cores; in IEEE fp32 the dx kernel's only one
    # (64x64 tiles with 4 warps, 80 words, spilled 3.4 KB on sm_80; 8 warps: 40 words, none)
    def tiles(kept):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                 c.num_warps) for c in kept]

    for br in (16, 64):
        for kernel in ("_main_kernel", "_dx_kernel"):
            assert kernels._FMA_ONLY not in tiles(pick(gemm, {"IEEE": False, "BLOCK_R": br},
                                                       kernel))
        assert tiles(pick(gemm, {"IEEE": True, "BLOCK_R": br, "HAS_BASE": True},
                          "_dx_kernel")) == [kernels._FMA_ONLY]
    # IEEE fp32 reduce over both passes holds X and X^T: at BR = 16 the 64x64 tile (96 words)
    # spilled 0.5-2.5 KB where 32x64 (56) spilled at most 16 B; one pass keeps 64x64 (48)
    def reduce_tiles(**nargs):
        kept = pick(reduce_, {"IEEE": True, "BLOCK_R": 16, **nargs}, "_reduce_kernel")
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_C"]) for c in kept]

    def x_of(size):
        return SimpleNamespace(element_size=lambda: size)

    assert reduce_tiles(DO_ROW=True, DO_COL=True) == [(32, 64)]
    assert reduce_tiles(DO_ROW=False, DO_COL=True) == [(64, 64), (32, 64)]
    assert reduce_tiles(DO_ROW=True, DO_COL=False) == [(64, 64), (32, 64)]
    # tf32 (fp32 on tensor cores): the reduce holds its X tile and X^T in registers; 128x64
    # spilled 1.3-1.5 KB per thread on sm_80 where 64x64 spilled 200-344 B. bf16 keeps all.
    for br in (16, 64, 128):
        tf32 = {"IEEE": False, "BLOCK_R": br, "DO_ROW": False, "DO_COL": True}
        assert reduce_tiles(**tf32, x_ptr=x_of(4)) == [(64, 64), (32, 64)]
        assert pick(reduce_, {**tf32, "x_ptr": x_of(2)}, "_reduce_kernel") == reduce_


def test_untuned_mode_keeps_one_config(monkeypatch):
    # AUTOTUNE=0 takes the first config that fits both targets; autotuning keeps every fit.
    from llm_adapters.triton_kernels import _limits

    cfgs = ["too_big", "fits", "also_fits"]
    cost = {"too_big": 10**9, "fits": 1, "also_fits": 2}
    monkeypatch.setenv("LLM_ADAPTERS_TRITON_AUTOTUNE", "0")
    assert _limits.choose(cfgs, lambda c, cc: cost[c], (90, 232448)) == ["fits"]
    monkeypatch.setenv("LLM_ADAPTERS_TRITON_AUTOTUNE", "1")
    assert _limits.choose(cfgs, lambda c, cc: cost[c], (90, 232448)) == ["fits", "also_fits"]
