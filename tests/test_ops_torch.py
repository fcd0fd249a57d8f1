"""The torch backend of ops.lora_linear / ops.series_adapter: math, gradients, dropout, errors."""

import pytest
import torch
from torch.library import opcheck

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.bench import parity
from llm_adapters.ops._custom import lora_op, series_op
from llm_adapters.ops._dispatch import resolve_backend

ACTS = list(ops.ACTIVATIONS)
F64 = torch.float64


def _rand(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_gradcheck_float64(act, p):
    m, k, n, r = 7, 11, 13, 3
    x = _rand(2, m, k)
    w = _rand(n, k, grad=False)
    bias, a, b = _rand(n), _rand(r, k), _rand(n, r)
    ab, bb, scale = _rand(r), _rand(n), torch.tensor(0.7, dtype=F64, requires_grad=True)

    def f(x, bias, a, b, ab, bb, scale):
        return ops.lora_linear(
            x, w, bias, a, b, scaling=scale, dropout_p=p, activation=act, seed=5,
            lora_a_bias=ab, lora_b_bias=bb,
        )

    assert torch.autograd.gradcheck(f, (x, bias, a, b, ab, bb, scale))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_series_gradcheck_float64(act, p):
    m, n, r = 9, 10, 4
    h = _rand(m, n)
    down, up, db, ub = _rand(r, n), _rand(n, r), _rand(r), _rand(n)
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)

    def f(h, down, up, db, ub, scale):
        return ops.series_adapter(
            h, down, up, scaling=scale, activation=act, dropout_p=p, seed=11,
            down_bias=db, up_bias=ub,
        )

    assert torch.autograd.gradcheck(f, (h, down, up, db, ub, scale))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lora_matches_reference_with_exact_mask(p):
    m, k, n, r = 37, 29, 23, 12
    x, w, bias = _rand(m, k), _rand(n, k, grad=False), _rand(n)
    a, b = _rand(r, k), _rand(n, r)
    keep = ops.dropout_mask((m, k), p, 123, backend="torch") if p else None
    _, inv_keep = dropout_threshold(p)
    y = ops.lora_linear(x, w, bias, a, b, scaling=1.5, dropout_p=p, seed=123, activation="tanh")
    ref = parity.lora_reference(x, w, bias, a, b, scaling=1.5, activation="tanh", keep=keep,
                                 inv_keep=inv_keep)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bias, a, b), g)
    want = torch.autograd.grad(ref, (x, bias, a, b), g)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-12, atol=1e-12)


def test_dropout_mask_is_reproducible_and_drops_p():
    m1 = ops.dropout_mask((300, 301), 0.05, 7, backend="torch")
    m2 = ops.dropout_mask((300, 301), 0.05, 7, backend="torch")
    m3 = ops.dropout_mask((300, 301), 0.05, 8, backend="torch")
    assert m1.dtype == torch.bool and torch.equal(m1, m2) and not torch.equal(m1, m3)
    dropped = 1 - m1.float().mean().item()
    assert abs(dropped - 0.05) < 0.004  # 90,300 draws: sd of the fraction ~ 7e-4
    t, inv_keep = dropout_threshold(0.05)
    assert t == 3277 and inv_keep == pytest.approx(65536 / (65536 - 3277))


def test_dropout_same_seed_same_output_and_unbiased():
    x = torch.ones(64, 512, dtype=F64)
    w = torch.zeros(1, 512, dtype=F64)
    a = torch.ones(1, 512, dtype=F64)
    b = torch.ones(1, 1, dtype=F64)
    y1 = ops.lora_linear(x, w, None, a, b, dropout_p=0.5, seed=3)
    y2 = ops.lora_linear(x, w, None, a, b, dropout_p=0.5, seed=3)
    y3 = ops.lora_linear(x, w, None, a, b, dropout_p=0.5, seed=4)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # each row sums 512 inverted-dropout draws of 1: the mean over rows is 512 in expectation
    assert abs(y1.mean().item() - 512) < 4 * (512**0.5) / 8


def _parity(fn_lp, fn_ref, inputs64, dtype):
    """Max |kernel - fp64| over output and grads must be within ~2x PyTorch's own error."""
    def run(fn, inputs, g):
        out = fn(*inputs)
        g = torch.randn_like(out) if g is None else g.to(out.dtype)
        leaves = [t for t in inputs if t.requires_grad]
        return out, torch.autograd.grad(out, leaves, g), g

    out64, grads64, g64 = run(fn_ref, inputs64, None)
    low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs64]
    out, grads, _ = run(fn_lp, low, g64)
    eager_low = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs64]
    eout, egrads, _ = run(fn_ref, eager_low, g64)
    pairs = [(out, eout, out64)] + list(zip(grads, egrads, grads64))
    assert len(pairs) > 1
    for i, (got, eager, ref) in enumerate(pairs):
        # a floor of 1e-6 of the largest value: an exact eager result must not demand more
        parity.assert_parity("output" if i == 0 else f"gradient {i - 1}", got, ref, eager,
                             rel_floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["identity", "gelu"])
def test_lora_low_precision_parity(dtype, act):
    m, k, n, r = 37, 64, 48, 12
    x, w, bias, a, b = _rand(m, k), _rand(n, k, grad=False), _rand(n), _rand(r, k), _rand(n, r)
    w.requires_grad_(False)

    def ours(x, w, bias, a, b):
        return ops.lora_linear(x, w, bias, a, b, scaling=2.0, activation=act)

    def ref(x, w, bias, a, b):
        return parity.lora_reference(x, w, bias, a, b, scaling=2.0, activation=act)

    _parity(ours, ref, [x, w, bias, a, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_series_low_precision_parity(dtype):
    m, n, r = 37, 72, 24
    h, down, up = _rand(m, n), _rand(r, n) * 0.1, _rand(n, r) * 0.1

    def ours(h, down, up):
        return ops.series_adapter(h, down, up, scaling=1.0, activation="tanh")

    def ref(h, down, up):
        return parity.series_reference(h, down, up, scaling=1.0, activation="tanh")

    _parity(ours, ref, [h, down.detach().requires_grad_(), up.detach().requires_grad_()], dtype)


def test_fp32_adapter_weights_with_bf16_activations():
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    y = ops.lora_linear(x, w, None, a, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32
    assert b.grad.dtype == torch.float32


def test_x_without_grad_and_frozen_adapter_parts():
    x = torch.randn(6, 10)
    w = torch.randn(7, 10)
    a = torch.randn(3, 10)
    b = torch.randn(7, 3, requires_grad=True)
    y = ops.lora_linear(x, w, None, a, b, dropout_p=0.1, seed=1)
    (gb,) = torch.autograd.grad(y.sum(), (b,))
    assert gb.shape == b.shape and gb.abs().sum() > 0


def test_opcheck_torch_backend():
    impl = resolve_backend("lora", torch.device("cpu"), "torch")
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(6, 8)
    args = (x, w, torch.randn(6), torch.randn(3, 8, requires_grad=True),
            torch.randn(6, 3, requires_grad=True), None, None, None, 2.0, 0.2,
            torch.tensor(4), "silu")
    opcheck(lora_op(impl), args)
    h = torch.randn(5, 8, requires_grad=True)
    sargs = (h, torch.randn(3, 8, requires_grad=True), torch.randn(8, 3, requires_grad=True),
             None, None, torch.tensor(0.5, requires_grad=True), 1.0, 0.1, torch.tensor(9), "tanh")
    opcheck(series_op(impl), sargs)


def test_compile_fullgraph_matches_eager():
    x = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(6, 8)
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(6, 3, requires_grad=True)

    def f(x, a, b):
        return ops.lora_linear(x, w, None, a, b, scaling=0.5, dropout_p=0.1, seed=3).sum()

    eager = torch.autograd.grad(f(x, a, b), (x, a, b))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, a, b), (x, a, b))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)


def test_3d_and_noncontiguous_input():
    x = torch.randn(4, 6, 10).transpose(0, 1)  # [6, 4, 10], not contiguous
    w, a, b = torch.randn(7, 10), torch.randn(3, 10), torch.randn(7, 3)
    y = ops.lora_linear(x, w, None, a, b, scaling=2.0)
    ref = x @ w.t() + 2.0 * (x @ a.t()) @ b.t()
    assert y.shape == (6, 4, 7)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(a=torch.randn(3, 9)), "lora_a has shape"),
        (dict(b=torch.randn(5, 3)), "lora_b has shape"),
        (dict(w=torch.randn(7, 9)), "weight has shape"),
        (dict(w=torch.randn(7, 10, dtype=torch.float64)), "weight dtype"),
        (dict(bias=torch.randn(6)), "bias has shape"),
        (dict(a=torch.randn(0, 10), b=torch.randn(7, 0)), "rank must be at least 1"),
        (dict(activation="swishy"), "unknown activation"),
        (dict(dropout_p=1.0), "dropout_p must be in"),
        (dict(backend="fast"), "unknown backend"),
        (dict(x=torch.randint(0, 3, (4, 10))), "dtype"),
        (dict(a=torch.randn(3, 10, device="meta")), "is on meta"),
    ],
)
def test_lora_bad_input_is_a_clear_error(change, message):
    args = dict(x=torch.randn(4, 10), w=torch.randn(7, 10), bias=None, a=torch.randn(3, 10),
                b=torch.randn(7, 3), activation="identity", dropout_p=0.0, backend=None)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        ops.lora_linear(args["x"], args["w"], args["bias"], args["a"], args["b"],
                        activation=args["activation"], dropout_p=args["dropout_p"],
                        backend=args["backend"])


def test_series_bad_input_is_a_clear_error():
    h = torch.randn(4, 10)
    with pytest.raises(ValueError, match="up has shape"):
        ops.series_adapter(h, torch.randn(3, 10), torch.randn(10, 4))
    with pytest.raises(ValueError, match="down has shape"):
        ops.series_adapter(h, torch.randn(3, 11), torch.randn(10, 3))


def test_trainable_base_weight_is_refused():
    w = torch.randn(7, 10, requires_grad=True)
    with pytest.raises(ValueError, match="must be frozen"):
        ops.lora_linear(torch.randn(4, 10), w, None, torch.randn(3, 10), torch.randn(7, 3))


def test_unavailable_backend_is_an_error_not_a_fallback(monkeypatch):
    with pytest.raises(ops.BackendUnavailableError):
        ops.lora_linear(torch.randn(4, 10), torch.randn(7, 10), None, torch.randn(3, 10),
                        torch.randn(7, 3), backend="cuda")
    monkeypatch.setenv("LLM_ADAPTERS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LLM_ADAPTERS_BACKEND"):
        ops.lora_linear(torch.randn(4, 10), torch.randn(7, 10), None, torch.randn(3, 10),
                        torch.randn(7, 3))


def test_backend_choice_is_marked_constant_for_compile():
    # ops marks its backend-choice function the way assume_constant_result does, without
    # importing torch._dynamo at package import; this fails if the decorator changes
    from llm_adapters.ops import _backend_name

    marked = torch.compiler.assume_constant_result(lambda: 0)
    attrs = {k: v for k, v in vars(marked).items()}
    assert attrs == {"_dynamo_marked_constant": True}
    assert _backend_name._dynamo_marked_constant is True
