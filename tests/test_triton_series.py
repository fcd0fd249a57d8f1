"""The Triton series bottleneck adapter (`triton_kernels/series.py`) against a float64 reference.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), in fp32
and fp16 on small odd shapes. Parity rule (DESIGN §6): the kernel's error against the float64
reference is at most twice that of the same computation done by PyTorch in the same dtype,
plus one unit of the dtype's precision at the reference's magnitude. bf16 and LLaMA shapes run
only on a GPU (`pytest -m gpu`): the interpreter computes bf16 `tl.dot` wrongly.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import llm_adapters as la
from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops._custom import series_op

triton = pytest.importorskip("triton")

CPU = torch.device("cpu")
GRAD_NAMES = ("h", "down", "up", "down_bias", "up_bias", "scale")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else CPU


# ---------------------------------------------------------------------------------------------
# Reference: the shared formula (llm_adapters/bench/parity.py), differentiated by autograd
# ---------------------------------------------------------------------------------------------


def reference(inputs: dict, g: torch.Tensor, activation: str, mask, p: float, dtype):
    """(z, grads by GRAD_NAMES, {"scale": Σ |terms| of d(scale)}) of the series reference
    computed in `dtype`, every input cast to it first (the weights too, as the backends do);
    `mask` is the [M, N] keep-mask."""
    wrt = [n for n in GRAD_NAMES if isinstance(inputs.get(n), torch.Tensor)]
    leaves = parity.leaves(inputs, dtype, wrt)
    keep, inv_keep = (mask, dropout_threshold(p)[1]) if p > 0 else (None, 1.0)

    def fn(h, down, up, scale, down_bias=None, up_bias=None):
        return parity.series_reference(h, down, up, scaling=scale, activation=activation,
                                       keep=keep, inv_keep=inv_keep, down_bias=down_bias,
                                       up_bias=up_bias)

    z, grads = parity.forward_and_grads(fn, leaves, g.to(dtype))
    # d(scale) = Σ (g Up) ⊙ φ(S) is one long sum with cancellation: its rounding error scales
    # with Σ |g||Up| |φ(S)|, not with its (small) value.
    with torch.no_grad():
        h2 = leaves["h"].reshape(-1, leaves["h"].shape[-1])
        hd = h2 if keep is None else h2 * keep * inv_keep
        s_pre = hd @ leaves["down"].t()
        if leaves.get("down_bias") is not None:
            s_pre = s_pre + leaves["down_bias"]
        g2 = g.to(dtype).reshape(h2.shape)
        phi = parity.ACTIVATION_FNS[activation](s_pre)
        mag = ((g2.abs() @ leaves["up"].abs()) * phi.abs()).sum()
    return z, grads, {"scale": mag.item()}


def assert_parity(name, got, ref, base, dtype, magnitude=None):
    """DESIGN §6 (parity.assert_parity) with this file's floor: one unit of `dtype`'s
    precision at `magnitude` (default max |ref|)."""
    parity.assert_parity(name, got, ref, base, rel_floor=torch.finfo(dtype).eps,
                         magnitude=magnitude)


def make_inputs(m, n, r, dtype, *, bias, learned, weight_dtype=torch.float32, device=CPU):
    h = torch.randn(m, n, dtype=dtype, device=device)
    down = (torch.randn(r, n, device=device) / n**0.5).to(weight_dtype)
    up = (torch.randn(n, r, device=device) / r**0.5).to(weight_dtype)
    inputs = {"h": h, "down": down, "up": up}
    if bias:
        inputs["down_bias"] = (0.1 * torch.randn(r, device=device)).to(weight_dtype)
        inputs["up_bias"] = (0.1 * torch.randn(n, device=device)).to(weight_dtype)
    inputs["scale"] = torch.tensor(0.75, device=device) if learned else 0.75
    return inputs


def run_op(inputs: dict, g, activation, p, seed, backend="triton"):
    """z and the grads (by GRAD_NAMES) of ops.series_adapter on `backend`."""
    leaves = {
        k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }
    z = ops.series_adapter(
        leaves["h"], leaves["down"], leaves["up"], scaling=leaves["scale"],
        activation=activation, dropout_p=p, seed=seed, down_bias=leaves.get("down_bias"),
        up_bias=leaves.get("up_bias"), backend=backend,
    )
    z.backward(g)
    grads = {n: leaves[n].grad for n in GRAD_NAMES if isinstance(leaves.get(n), torch.Tensor)}
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == leaves[name].dtype, f"{name} grad dtype {grad.dtype}"
    return z.detach(), grads


def check_against_reference(inputs, activation, p, seed, dtype):
    h = inputs["h"]
    m, n = h.reshape(-1, h.shape[-1]).shape
    mask = ops.dropout_mask((m, n), p, seed, device=h.device, backend="triton") if p else None
    g = torch.randn_like(h)
    z, grads = run_op(inputs, g, activation, p, seed)
    z64, ref, mags = reference(inputs, g, activation, mask, p, torch.float64)
    z_lo, base, _ = reference(inputs, g, activation, mask, p, dtype)
    assert z.dtype == h.dtype and z.shape == h.shape
    assert_parity("z", z, z64, z_lo, dtype)
    for name in ref:
        assert_parity(f"d{name}", grads[name], ref[name], base[name], dtype, mags.get(name))


# ---------------------------------------------------------------------------------------------
# Parity on odd shapes: every activation, fp32 and fp16, dropout off and on, every gradient
# ---------------------------------------------------------------------------------------------

# (rows, hidden, bottleneck, dtype, activation, dropout p, biases, learned scale)
CASES = [
    (1, 45, 1, torch.float32, "identity", 0.0, False, False),
    (300, 45, 1, torch.float16, "identity", 0.1, True, True),
    (37, 100, 12, torch.float32, "tanh", 0.0, True, True),
    (37, 100, 12, torch.float16, "tanh", 0.1, True, False),
    (300, 70, 24, torch.float32, "gelu", 0.2, True, True),
    (37, 45, 256, torch.float16, "gelu", 0.0, True, False),
    (37, 45, 256, torch.float32, "relu", 0.1, True, True),
    (1, 100, 12, torch.float16, "relu", 0.3, True, True),
    (37, 70, 24, torch.float32, "silu", 0.5, False, False),
    (300, 70, 24, torch.float16, "silu", 0.0, False, True),
    (1, 70, 256, torch.float16, "tanh", 0.2, True, True),
]


@pytest.mark.parametrize(
    "m,n,r,dtype,activation,p,bias,learned",
    CASES,
    ids=[f"{c[0]}x{c[1]}r{c[2]}-{str(c[3])[6:]}-{c[4]}-p{c[5]}" for c in CASES],
)
def test_parity_with_float64(m, n, r, dtype, activation, p, bias, learned):
    inputs = make_inputs(m, n, r, dtype, bias=bias, learned=learned)
    check_against_reference(inputs, activation, p, seed=1234 + m, dtype=dtype)


def test_low_precision_weights():
    """fp16 adapter weights (and biases, and scale) with fp16 h: no upcast anywhere."""
    inputs = make_inputs(37, 70, 12, torch.float16, bias=True, learned=True,
                         weight_dtype=torch.float16)
    inputs["scale"] = inputs["scale"].half()
    check_against_reference(inputs, "tanh", 0.1, seed=5, dtype=torch.float16)


def test_three_dim_and_non_contiguous_h():
    base = make_inputs(37, 70, 12, torch.float32, bias=True, learned=False)
    h3 = torch.randn(2, 19, 70)
    check_against_reference({**base, "h": h3}, "gelu", 0.2, seed=9, dtype=torch.float32)

    # A transposed view: rows are not contiguous; the op must see the logical [M, N] layout
    # (dropout index m * N + n refers to the logical position).
    h_nc = torch.randn(70, 37).t()
    assert not h_nc.is_contiguous()
    g = torch.randn(37, 70)
    z_nc, grads_nc = run_op({**base, "h": h_nc}, g, "gelu", 0.2, seed=9)
    z_c, grads_c = run_op({**base, "h": h_nc.contiguous()}, g, "gelu", 0.2, seed=9)
    torch.testing.assert_close(z_nc, z_c, rtol=0, atol=0)
    for name in grads_c:
        torch.testing.assert_close(grads_nc[name], grads_c[name], rtol=0, atol=0)
    check_against_reference({**base, "h": h_nc}, "gelu", 0.2, seed=9, dtype=torch.float32)

    # Transposed weight views (e.g. a tied or Conv1D-style layout): read through their strides.
    weights_nc = {"down": base["down"].t().contiguous().t(), "up": base["up"].t().contiguous().t()}
    assert not weights_nc["down"].is_contiguous() and not weights_nc["up"].is_contiguous()
    z_w, grads_w = run_op({**base, **weights_nc, "h": h_nc}, g, "gelu", 0.2, seed=9)
    torch.testing.assert_close(z_w, z_c, rtol=0, atol=0)
    for name in grads_c:
        torch.testing.assert_close(grads_w[name], grads_c[name], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Dropout: the mask is the shared Philox definition, identical in forward and backward
# ---------------------------------------------------------------------------------------------


def test_dropout_mask_is_shared_and_reused_in_backward():
    from llm_adapters.triton_kernels.dropout import keep_mask
    from llm_adapters.triton_kernels.series import series_backward, series_forward

    m, n, r, p, seed = 37, 70, 12, 0.3, 2**40 + 17
    h = torch.randn(m, n)
    down = torch.randn(r, n) / n**0.5
    up = torch.randn(n, r)
    mask = ops.dropout_mask((m, n), p, seed, backend="triton")
    assert torch.equal(mask, keep_mask((m, n), p, seed, CPU))
    assert 0.6 < mask.float().mean().item() < 0.8

    z, s_pre, stored = series_forward(h, down, up, None, None, None, 1.0, p, seed, "identity")
    assert stored.dtype == torch.bool and stored.numel() == 0  # stores_mask=False
    assert s_pre.dtype == torch.float32 and s_pre.shape == (m, r)
    inv_keep = dropout_threshold(p)[1]
    s_ref = (torch.where(mask, h.double(), 0.0) @ down.double().t()) * inv_keep
    torch.testing.assert_close(s_pre.double(), s_ref, rtol=1e-5, atol=1e-5)

    # dh = g + D'(dS Dn): exactly g wherever the forward dropped the element.
    g = torch.randn(m, n)
    needs = [True, False, False, False, False, False]
    dh = series_backward(g, h, down, up, None, 1.0, p, seed, "identity", s_pre, stored, needs)[0]
    assert torch.equal(dh[~mask], g[~mask])
    assert (dh[mask] != g[mask]).float().mean() > 0.9

    # Same seed, same result; another seed, another mask.
    z2 = series_forward(h, down, up, None, None, None, 1.0, p, seed, "identity")[0]
    z3 = series_forward(h, down, up, None, None, None, 1.0, p, seed + 1, "identity")[0]
    assert torch.equal(z, z2)
    assert not torch.equal(z, z3)


# ---------------------------------------------------------------------------------------------
# Backend contract: `needs` flags, dtypes, determinism, float64, custom-op registration
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [12, 256])
def test_needs_flags_and_determinism(r):
    from llm_adapters.triton_kernels.series import series_backward, series_forward

    m, n, p, seed = 300 if r < 64 else 37, 45, 0.1, 77
    h = torch.randn(m, n, dtype=torch.float16)
    down = torch.randn(r, n) / n**0.5
    up = torch.randn(n, r) / r**0.5
    scale_t = torch.tensor(1.5)
    z, s_pre, mask = series_forward(h, down, up, None, None, scale_t, 1.0, p, seed, "silu")
    g = torch.randn(m, n, dtype=torch.float16)
    args = (g, h, down, up, scale_t, 1.0, p, seed, "silu", s_pre, mask)
    full = series_backward(*args, [True] * 6)
    again = series_backward(*args, [True] * 6)
    shapes = [(m, n), (r, n), (n, r), (r,), (n,), ()]
    for i, (t, t2) in enumerate(zip(full, again, strict=True)):
        assert torch.equal(t, t2), f"gradient {i} is not deterministic"
        assert tuple(t.shape) == shapes[i]
        assert t.dtype == (torch.float16 if i == 0 else torch.float32)
    for i in range(6):
        needs = [j == i for j in range(6)]
        out = series_backward(*args, needs)
        for j, t in enumerate(out):
            if j == i:
                assert torch.equal(t, full[i]), f"gradient {i} differs when computed alone"
            else:
                assert t.numel() == 0 and t.shape == (0,)


def test_float64_falls_back_with_the_same_mask():
    inputs = make_inputs(3, 10, 2, torch.float64, bias=True, learned=True,
                         weight_dtype=torch.float64)
    inputs["scale"] = inputs["scale"].double()
    leaves = [
        inputs[k].detach().double().requires_grad_(True)
        for k in ("h", "down", "up", "down_bias", "up_bias", "scale")
    ]

    def fn(h, down, up, db, ub, scale):
        return ops.series_adapter(
            h, down, up, scaling=scale, activation="gelu", dropout_p=0.2, seed=3,
            down_bias=db, up_bias=ub, backend="triton",
        )

    assert torch.autograd.gradcheck(fn, leaves)
    # The float64 path uses the kernels' Philox mask, not the torch backend's.
    mask = ops.dropout_mask((3, 10), 0.2, 3, backend="triton")
    g = torch.randn(3, 10, dtype=torch.float64)
    z, grads = run_op(inputs, g, "tanh", 0.2, seed=3)
    z_ref, ref, _ = reference(inputs, g, "tanh", mask, 0.2, torch.float64)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-12, atol=1e-12)


def test_opcheck():
    backend = ops.resolve_backend("series", CPU, "triton")
    op = series_op(backend)
    m, n, r = 5, 40, 3
    h = torch.randn(m, n, requires_grad=True)
    down = torch.randn(r, n, requires_grad=True)
    up = torch.randn(n, r, requires_grad=True)
    db = torch.randn(r, requires_grad=True)
    ub = torch.randn(n, requires_grad=True)
    scale = torch.tensor(0.5, requires_grad=True)
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(op, (h, down, up, db, ub, scale, 1.0, 0.1, seed, "tanh"))
    torch.library.opcheck(op, (h, down, up, None, None, None, 2.0, 0.0, seed, "relu"))


def test_torch_compile_fullgraph():
    inputs = make_inputs(9, 20, 3, torch.float32, bias=True, learned=True)

    def f(h, down, up, db, ub, scale):
        z = ops.series_adapter(h, down, up, scaling=scale, activation="silu", dropout_p=0.1,
                               seed=3, down_bias=db, up_bias=ub, backend="triton")
        return (z * z).sum()

    names = ("h", "down", "up", "down_bias", "up_bias", "scale")
    # The backend module and its custom op are created on first use, which dynamo cannot
    # trace (an import, a schema inference): create them before compiling.
    series_op(ops.resolve_backend("series", CPU, "triton"))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    runs = []
    for fn in (compiled, f):
        leaves = [inputs[k].detach().clone().requires_grad_(True) for k in names]
        loss = fn(*leaves)
        loss.backward()
        runs.append((loss.detach(), [t.grad for t in leaves]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    for name, a, b in zip(names, runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"d{name} differs when compiled")


def test_bad_input_is_named():
    from llm_adapters.triton_kernels.series import series_forward

    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="up has shape"):
        series_forward(h, torch.randn(2, 8), torch.randn(8, 3), None, None, None, 1.0, 0.0, 0,
                       "tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        series_forward(h, torch.randn(2, 8), torch.randn(8, 2), None, None, None, 1.0, 0.0, 0,
                       "swish")
    with pytest.raises(ValueError, match="down has shape"):
        series_forward(h, torch.randn(2, 7), torch.randn(8, 2), None, None, None, 1.0, 0.0, 0,
                       "tanh")


# ---------------------------------------------------------------------------------------------
# GPU: LLaMA shapes in bf16 / fp16, large bottleneck and hidden sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_llama_shapes(dtype, p):
    inputs = make_inputs(8192, 4096, 256, dtype, bias=False, learned=False, device=_device())
    check_against_reference(inputs, "tanh", p, seed=4321, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,n,r,activation",
    [(1000, 16384, 64, "gelu"), (777, 4096, 1024, "silu"), (513, 5120, 1, "relu")],
)
def test_gpu_large_hidden_and_bottleneck(m, n, r, activation, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_TRITON_AUTOTUNE", "0")  # one compile per shape, not six
    inputs = make_inputs(m, n, r, torch.bfloat16, bias=True, learned=True, device=_device())
    check_against_reference(inputs, activation, 0.1, seed=99, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp32_is_not_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the fp32 baseline
    monkeypatch.setenv("LLM_ADAPTERS_TRITON_AUTOTUNE", "0")
    inputs = make_inputs(1000, 4096, 64, torch.float32, bias=True, learned=True, device=_device())
    check_against_reference(inputs, "gelu", 0.1, seed=5, dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_deterministic_backward_and_mask():
    from llm_adapters.triton_kernels.dropout import keep_mask

    dev = _device()
    inputs = make_inputs(4096, 4096, 256, torch.bfloat16, bias=True, learned=True, device=dev)
    g = torch.randn_like(inputs["h"])
    z1, g1 = run_op(inputs, g, "tanh", 0.1, seed=2**50 + 3)
    z2, g2 = run_op(inputs, g, "tanh", 0.1, seed=2**50 + 3)
    assert torch.equal(z1, z2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), f"d{name} is not deterministic"
    mask = ops.dropout_mask((4096, 4096), 0.1, 2**50 + 3, device=dev, backend="triton")
    assert torch.equal(mask, keep_mask((4096, 4096), 0.1, 2**50 + 3, dev))


# ---------------------------------------------------------------------------------------------
# Model level: a tiny LLaMA with AdapterH / AdapterP trains the same on triton as on torch
# ---------------------------------------------------------------------------------------------


def _adapter_loss_and_grads(model_dtype, config, backend, monkeypatch):
    monkeypatch.setenv("LLM_ADAPTERS_BACKEND", backend)
    impl = ops.resolve_backend("series", CPU, backend)
    calls = []
    for fn in ("series_forward", "series_backward"):
        real = getattr(impl, fn)
        monkeypatch.setattr(impl, fn, lambda *a, _f=real, _n=fn: calls.append(_n) or _f(*a))
    model = la.get_adapter_model(tiny_model("llama").to(model_dtype), config)
    with torch.no_grad():  # move every adapter off its N(0, 0.02) init so φ is not linear
        for name, param in model.named_parameters():
            if param.requires_grad and param.dim() == 2:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    out = model(**tiny_batch(batch=3, length=11))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert "series_forward" in calls and "series_backward" in calls, f"{backend} was not used"
    return out.loss.detach(), grads


@pytest.mark.parametrize(
    "placement,activation", [("series", "tanh"), ("adapterp", "gelu")], ids=["AdapterH", "AdapterP"]
)
def test_tiny_llama_trains_the_same_on_triton(placement, activation, monkeypatch):
    """A tiny LLaMA with AdapterH / AdapterP: the loss and every adapter gradient on the triton
    backend are as close to a float64 run as the torch backend's float32 run is."""
    config = la.BottleneckConfig(
        bottleneck_size=12, non_linearity=activation, use_adapterp=placement == "adapterp",
        scaling="learned", use_bias=True,
    )
    loss64, ref = _adapter_loss_and_grads(torch.float64, config, "torch", monkeypatch)
    loss32, base = _adapter_loss_and_grads(torch.float32, config, "torch", monkeypatch)
    loss_tr, grads = _adapter_loss_and_grads(torch.float32, config, "triton", monkeypatch)
    assert set(grads) == set(ref)
    assert any("adapter_scale" in n for n in grads)
    assert_parity("loss", loss_tr, loss64, loss32, torch.float32)
    for name in ref:
        assert_parity(name, grads[name], ref[name], base[name], torch.float32)


@pytest.mark.parametrize("cc", [90, 80], ids=["H100", "A100"])
def test_autotune_space_fits_shared_memory(cc, monkeypatch):
    """Every (r, dtype) case keeps at least one GPU config whose modelled shared memory fits
    the target (tests/test_aot.py holds the model against compiles of these kernels)."""
    from types import SimpleNamespace

    from llm_adapters.triton_kernels import _limits, series

    monkeypatch.setattr(series, "_MAX_BLOCK_R", 256)
    limit = _limits.TARGETS[cc]

    def tensor(size):
        return SimpleNamespace(element_size=lambda: size, device=torch.device("cuda"))

    kernels = {
        "rows": ("_series_forward_kernel", "_series_backward_rows_kernel"),
        "weights": ("_series_backward_weights_kernel",),
    }
    for act, weight in [(2, 4), (2, 2), (4, 4)]:
        for r in (1, 12, 64, 256, 300, 1024):
            block_r = series._block_r(r)
            args = {"h_ptr": tensor(act), "g_ptr": tensor(act), "dn_ptr": tensor(weight),
                    "R": r, "BLOCK_R": block_r, "ONE_R_TILE": block_r >= r, "IEEE": act == 4}
            for kind, names in kernels.items():
                configs = series._configs(kind, interpret=False)
                for name in names:
                    kept = series._prune(name)(configs, args, target=(cc, limit), autotune=True)
                    costs = [series._smem_model(name, c, args, cc) for c in kept]
                    assert kept and max(costs) <= limit, (name, act, weight, r)
                    if kind == "weights" and r == 256:  # the pruning is not a no-op
                        assert len(kept) < len(configs)
    args = {"h_ptr": tensor(2), "g_ptr": tensor(2), "dn_ptr": tensor(2), "R": 64, "BLOCK_R": 64,
            "ONE_R_TILE": True, "IEEE": False}
    for kind, names in kernels.items():
        for name in names:
            kept = series._prune(name)(
                series._configs(kind, interpret=False), args, target=(cc, limit), autotune=False
            )
            assert len(kept) == 1


# The configs the register rules allow, per kernel kind and rank block, as the AOT compiles
# (sm_80, sm_90, every config) found them; (BLOCK_M, BLOCK_N, warps, stages), None = all.
_ALLOWED = {
    # tensor cores: the row kernels' 128-row tile at BR = 256 spilled up to 2.9 KB per thread
    ("rows", False): {16: None, 64: None, 128: None,
                      256: {(16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 4, 3),
                            (64, 64, 8, 3)}},
    # the weight gradient past 160 words per thread spilled 0.5-2.4 KB (64x64 at BR = 64,
    # 4-warp tiles at BR = 128 and 256, 32x64x8 at BR = 256)
    ("weights", False): {16: None,
                         64: {(16, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 3), (32, 64, 8, 2),
                              (16, 32, 8, 2)},
                         128: {(32, 64, 8, 2), (16, 32, 8, 2)}, 256: {(16, 32, 8, 2)}},
    # IEEE fp32 (FMA): rows of 16 from BR = 64 (more spilled up to 30 KB); the weight gradient
    # at most 32 rows (64 rows spilled 1,072 B at BR = 16), 16 and 8 warps from BR = 128
    ("rows", True): {16: None, 64: {(16, 64, 4, 2)}, 128: {(16, 64, 4, 2)},
                     256: {(16, 64, 4, 2)}},
    ("weights", True): {16: {(16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (16, 32, 8, 2)},
                        64: {(16, 64, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (16, 32, 8, 2)},
                        128: {(16, 32, 8, 2)}, 256: {(16, 32, 8, 2)}},
}


@pytest.mark.parametrize("ieee", [False, True], ids=["tensor-cores", "ieee-fp32"])
def test_pruning_keeps_only_configs_that_did_not_spill(ieee):
    """Pruning keeps, per rank block, only the configs the AOT compiles found not to spill
    heavily (`_ALLOWED`), some remain on both targets and with AUTOTUNE=0, so the fallback to
    every config is not what makes a launch possible."""
    from types import SimpleNamespace

    from llm_adapters.triton_kernels import _limits, series

    size = 4 if ieee else 2
    t = SimpleNamespace(element_size=lambda: size, device=torch.device("cuda"))
    kernels = {
        "_series_forward_kernel": "rows",
        "_series_backward_rows_kernel": "rows",
        "_series_backward_weights_kernel": "weights",
    }

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    for name, kind in kernels.items():
        configs = series._configs(kind, interpret=False)
        for br, allowed in _ALLOWED[(kind, ieee)].items():
            args = {"h_ptr": t, "g_ptr": t, "dn_ptr": t, "R": br, "BLOCK_R": br,
                    "ONE_R_TILE": True, "IEEE": ieee, "HAS_DROPOUT": True}
            assert {key(c) for c in configs if series._accumulators_fit(name, c, args)} == (
                {key(c) for c in configs} if allowed is None else allowed), (name, br)
            for cc, limit in _limits.TARGETS.items():
                for autotune in (True, False):
                    kept = series._prune(name)(configs, args, target=(cc, limit),
                                               autotune=autotune)
                    assert kept, (name, br, cc, autotune)
                    assert allowed is None or {key(c) for c in kept} <= allowed
                    assert all(series._smem_model(name, c, args, cc) <= limit for c in kept)
