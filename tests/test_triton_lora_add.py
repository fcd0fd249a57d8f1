"""The `triton` backend of ops.lora_add (the LoRA / parallel branch added into a base output y0
that a quantized layer computed) against float64.

On CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest) in
fp32 and fp16 (bf16 `tl.dot` is wrong under the interpreter). Parity rule (DESIGN §6): the
kernel's error against a float64 reference with the kernels' own keep-mask is at most about
twice the error of the same computation done by PyTorch in the same dtype. Shapes are tiny
and odd: M not a multiple of the 32-row block, K and N not powers of two and over one block.
"""

from __future__ import annotations

import pytest
import torch

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops._custom import lora_add_op
from llm_adapters.ops._dispatch import resolve_backend

BACKEND = "triton"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_NAMES = ("x", "y0", "lora_a", "lora_b", "lora_a_bias", "lora_b_bias", "scale")


def _make(m, k, n, r, dtype, *, branch_bias=True, learned=True, lead=()):
    """Inputs with a real layer's magnitudes; y0 stands for the quantized base's output."""
    return {
        "x": torch.randn(*lead, m, k, device=DEV).to(dtype),
        "y0": torch.randn(*lead, m, n, device=DEV).to(dtype),
        "lora_a": torch.randn(r, k, device=DEV) / k**0.5,
        "lora_b": torch.randn(n, r, device=DEV) / r**0.5,
        "lora_a_bias": torch.randn(r, device=DEV) * 0.1 if branch_bias else None,
        "lora_b_bias": torch.randn(n, device=DEV) * 0.1 if branch_bias else None,
        "scale": torch.tensor(0.7, device=DEV) if learned else 1.3,
    }


def _op(lv, act, p, seed, backend=BACKEND):
    return ops.lora_add(lv["y0"], lv["x"], lv["lora_a"], lv["lora_b"], scaling=lv["scale"],
                        dropout_p=p, activation=act, seed=seed, lora_a_bias=lv["lora_a_bias"],
                        lora_b_bias=lv["lora_b_bias"], backend=backend)


def _reference(lv, act, p, keep):
    """y0 + the shared reference's branch (lora_reference with a zero base weight, which adds
    an exact 0), in x's dtype."""
    x, y0 = lv["x"], lv["y0"]
    w0 = torch.zeros(y0.shape[-1], x.shape[-1], dtype=x.dtype, device=x.device)
    branch = parity.lora_reference(
        x, w0, None, lv["lora_a"], lv["lora_b"], scaling=lv["scale"], activation=act,
        keep=keep, inv_keep=dropout_threshold(p)[1], lora_a_bias=lv["lora_a_bias"],
        lora_b_bias=lv["lora_b_bias"])
    return y0 + branch


def _assert_parity(name, got, ref, same, dtype, magnitude=None):
    # the floor of tests/test_triton_lora.py: four float32 roundings of the largest value; a
    # scalar (d(scale), d(lora_a_bias) at r = 1: both cancel) one rounding in the dtype of its
    # sum of |terms|
    if ref.numel() == 1:
        rel_floor, magnitude = torch.finfo(dtype).eps, magnitude or 8 * ref.abs().item()
    else:
        rel_floor, magnitude = 4 * torch.finfo(torch.float32).eps, None
    parity.assert_parity(name, got, ref, same, rel_floor=rel_floor, magnitude=magnitude,
                         check_dtype=True)


def _check_case(m, k, n, r, dtype, act, p, *, seed=1234, lead=(), x_grad=True, run=_op, **kw):
    """The op (`run`: this file's triton call, or another backend's) against float64 with
    the kernels' keep-mask: output, dy0 = g, and every other gradient."""
    t = _make(m, k, n, r, dtype, lead=lead, **kw)
    wrt = [nm for nm in _NAMES if isinstance(t[nm], torch.Tensor) and (x_grad or nm != "x")]
    rows = t["x"].numel() // k
    keep = ops.dropout_mask((rows, k), p, seed, DEV, backend=BACKEND) if p else None
    g = torch.randn(*lead, m, n, device=DEV).to(dtype)
    lv = parity.leaves(t, wrt=wrt)
    y0_before = lv["y0"].detach().clone()
    y, ours = parity.forward_and_grads(lambda **a: run(a, act, p, seed), lv, g)
    assert y.dtype == dtype and y.shape == (*lead, m, n)
    assert torch.equal(lv["y0"].detach(), y0_before)  # y0 is read, never written
    y_ref, refs = parity.forward_and_grads(
        lambda **a: _reference(a, act, p, keep), parity.leaves(t, torch.float64, wrt), g)
    y_same, sames = parity.forward_and_grads(
        lambda **a: _reference(a, act, p, keep), parity.leaves(t, None, wrt), g)
    _assert_parity("y", y, y_ref, y_same, dtype)
    assert torch.equal(ours["y0"], g)  # dy0 = g, handed on as it is
    mags = parity.lora_scalar_magnitudes(lv, g, activation=act, keep=keep,
                                         inv_keep=dropout_threshold(p)[1])
    for name in wrt:
        mag = mags.get(name) if refs[name].numel() == 1 else None
        _assert_parity(f"d{name}", ours[name], refs[name], sames[name], dtype, mag)
    if not x_grad:
        assert lv["x"].grad is None and "x" not in ours


# fp32 and fp16 × dropout off/on × identity/tanh × branch biases on/off; r alternates between
# 1 and 12 so that both ranks meet every option.
_CASES = [
    (dtype, p, act, biases, 1 if (i + j) % 2 else 12)
    for i, (p, act) in enumerate([(0.0, "identity"), (0.25, "identity"), (0.0, "tanh"),
                                  (0.25, "tanh")])
    for j, biases in enumerate((True, False))
    for dtype in (torch.float32, torch.float16)
]


@pytest.mark.parametrize(
    "dtype,p,act,biases,r", _CASES,
    ids=[f"{str(d)[6:]}-p{p}-{a}-{'bias' if b else 'nobias'}-r{r}" for d, p, a, b, r in _CASES])
def test_parity(dtype, p, act, biases, r):
    # M = 37 (two row blocks, a ragged one), K = 45 and N = 41 (two blocks each, ragged)
    _check_case(37, 45, 41, r, dtype, act, p, branch_bias=biases, learned=biases)


def test_three_dim_x_float_scale_no_x_grad():
    # leading dims flattened; x of a first layer (no dx: the dx kernel never runs)
    _check_case(13, 45, 41, 12, torch.float32, "tanh", 0.25, lead=(3,), x_grad=False,
                learned=False)


def test_same_mask_and_numbers_as_lora_linear():
    """lora_add over y0 = x Wᵀ + b equals lora_linear on the same seed: one Philox stream for
    both ops (forward and every gradient, up to where the base product is rounded)."""
    m, k, n, r, p, seed = 37, 45, 41, 12, 0.3, 2**40 + 5
    t = _make(m, k, n, r, torch.float32)
    w = torch.randn(n, k, device=DEV) / k**0.5
    bias = torch.randn(n, device=DEV) * 0.1
    g = torch.randn(m, n, device=DEV)
    lv = parity.leaves({**t, "y0": None}, wrt=["x", "lora_a", "lora_b", "lora_a_bias"])
    y_lin = ops.lora_linear(lv["x"], w, bias, lv["lora_a"], lv["lora_b"], scaling=0.5,
                            dropout_p=p, activation="tanh", seed=seed,
                            lora_a_bias=lv["lora_a_bias"], backend=BACKEND)
    grads_lin = torch.autograd.grad(y_lin, [lv[nm] for nm in ("x", "lora_a", "lora_b")], g)
    lv2 = parity.leaves({**t, "y0": None}, wrt=["x", "lora_a", "lora_b", "lora_a_bias"])
    y0 = torch.addmm(bias, lv2["x"], w.t())  # the base layer, differentiated by autograd
    y_add = ops.lora_add(y0, lv2["x"], lv2["lora_a"], lv2["lora_b"], scaling=0.5, dropout_p=p,
                         activation="tanh", seed=seed, lora_a_bias=lv2["lora_a_bias"],
                         backend=BACKEND)
    grads_add = torch.autograd.grad(y_add, [lv2[nm] for nm in ("x", "lora_a", "lora_b")], g)
    torch.testing.assert_close(y_add, y_lin, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_add, grads_lin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_kernels_skip_the_base_gemm(monkeypatch):
    """The forward runs the shrink and the main kernel without its base GEMM, the backward the
    dx kernel without its g W product (HAS_BASE=False); nothing else is launched."""
    from llm_adapters.triton_kernels import lora as kernels

    launched = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(kernels, name)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((self.name, kwargs.get("HAS_BASE")))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_shrink_kernel", "_main_kernel", "_dx_kernel", "_reduce_kernel"):
        monkeypatch.setattr(kernels, name, Spy(name))
    lv = parity.leaves(_make(37, 45, 41, 12, torch.float32), wrt=["x", "lora_a", "lora_b"])
    _op(lv, "identity", 0.1, 3).sum().backward()
    assert launched == [("_shrink_kernel", None), ("_main_kernel", False),
                        ("_reduce_kernel", None), ("_dx_kernel", False),
                        ("_reduce_kernel", None)]


def test_float64_runs_in_pytorch_with_the_philox_mask():
    m, k, n, r, p, seed = 7, 9, 6, 3, 0.3, 11
    t = _make(m, k, n, r, torch.float64)
    t = {nm: v.double() if isinstance(v, torch.Tensor) else v for nm, v in t.items()}
    lv = parity.leaves(t, wrt=list(_NAMES))
    args = [lv[nm] for nm in _NAMES]

    def fn(x, y0, a, b, ab, bb, scale):
        return ops.lora_add(y0, x, a, b, scaling=scale, dropout_p=p, activation="tanh",
                            seed=seed, lora_a_bias=ab, lora_b_bias=bb, backend=BACKEND)

    assert torch.autograd.gradcheck(fn, args)
    keep = ops.dropout_mask((m, k), p, seed, DEV, backend=BACKEND)
    torch.testing.assert_close(fn(*args), _reference(lv, "tanh", p, keep))


def test_auto_picks_triton_under_the_interpreter_else_torch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("lora_add", cpu, "auto").name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert resolve_backend("lora_add", cpu, "auto").name == "torch"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(a=torch.randn(3, 9)), "lora_a has shape"),
        (dict(b=torch.randn(7, 4)), "lora_b has shape"),
        (dict(b=torch.randn(7)), "lora_b must be 2-D"),
        (dict(a=torch.randn(0, 10), b=torch.randn(7, 0)), "rank must be at least 1"),
        (dict(lora_b_bias=torch.randn(6)), "lora_b_bias has shape"),
        (dict(y0=torch.randn(4, 6)), "y0 has shape"),
        (dict(activation="swishy"), "unknown activation"),
        (dict(a=[[0.0] * 10] * 3), "lora_a must be a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    # the checks lora_add shares with lora_linear, before any backend is chosen
    args = dict(y0=torch.randn(4, 7), x=torch.randn(4, 10), a=torch.randn(3, 10),
                b=torch.randn(7, 3), lora_b_bias=None, activation="identity")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.lora_add(args["y0"], args["x"], args["a"], args["b"], activation=args["activation"],
                     lora_b_bias=args["lora_b_bias"], backend=BACKEND)


def test_opcheck():
    op = lora_add_op(resolve_backend("lora_add", torch.device(DEV), BACKEND))
    t = _make(21, 40, 30, 12, torch.float32)
    lv = parity.leaves(t, wrt=list(_NAMES))
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(op, (lv["x"], lv["y0"], lv["lora_a"], lv["lora_b"],
                               lv["lora_a_bias"], lv["lora_b_bias"], lv["scale"], 1.0, 0.2,
                               seed, "tanh"))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    # the custom op traces without graph breaks, the base product before it included (about
    # 6 s on CPU under the interpreter, most of it Inductor's own compile)
    t = _make(9, 20, 12, 4, torch.float32)
    w = torch.randn(12, 20, device=DEV)

    def f(x, a, b):
        y = ops.lora_add(x @ w.t(), x, a, b, scaling=0.5, dropout_p=0.1, activation="silu",
                         seed=3, backend=BACKEND)
        return (y * y).sum()

    wrt = ["x", "lora_a", "lora_b"]
    lv, lv_e = parity.leaves(t, wrt=wrt), parity.leaves(t, wrt=wrt)
    loss = torch.compile(f, fullgraph=True)(*(lv[n] for n in wrt))
    loss.backward()
    loss_e = f(*(lv_e[n] for n in wrt))
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e)
    for name in wrt:
        torch.testing.assert_close(lv[name].grad, lv_e[name].grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_llama_shapes(dtype):
    # LLaMA-7B's projection (M = 4096 tokens, K = N = 4096, r = 16) and a ragged one
    _check_case(4096, 4096, 4096, 16, dtype, "identity", 0.1)
    _check_case(1000, 1000, 3000, 24, dtype, "tanh", 0.1)
