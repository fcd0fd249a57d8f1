"""Adapters on quantized base layers: bitsandbytes 4-bit (NF4 / FP4, double quantization,
compute dtypes) and 8-bit, torchao NF4.

Each adapter kind's output, adapter gradients and dx are compared with a float64 computation
on the dequantized weight, with the same dropout mask. The tolerance is measured, never fixed:
twice the error of the quantized base layer itself against that same float64 product (its
output for outputs, its own dx for dx), taken with the adapter's own float64 error floor."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from llm_adapters import ops
from llm_adapters._numerics import dropout_threshold
from llm_adapters.layers import BottleneckAdapter, LoraLinear, _quant

bnb = pytest.importorskip("bitsandbytes")

K, N, R = 72, 40, 4  # K*N = 2880: 4-bit packs the flattened weight, any K works


def _bnb4(quant_type="nf4", double_quant=False, compute_dtype=torch.float32, k=K, n=N,
          seed=0, bias=True):
    torch.manual_seed(seed)
    ref = nn.Linear(k, n, bias=bias)
    q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype,
                          compress_statistics=double_quant, quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False,
                                 compress_statistics=double_quant, quant_type=quant_type)
    if bias:
        q.bias = nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def _bnb8(k=K, n=N, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(k, n)
    q = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(ref.weight.data.clone(), requires_grad=False,
                                 has_fp16_weights=False)
    q.bias = nn.Parameter(ref.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _nf4(dtype=torch.bfloat16, k=K, n=N, seed=0):
    to_nf4 = _quant.require_torchao()
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False, dtype=dtype)
    lin.weight = nn.Parameter(to_nf4(lin.weight.data, 32, 9), requires_grad=False)
    return lin


# name -> (builder, activation dtype x)
BASES = {
    "nf4-fp32": (lambda: _bnb4("nf4"), torch.float32),
    "nf4-bf16": (lambda: _bnb4("nf4", compute_dtype=torch.bfloat16), torch.float32),
    "nf4-dq-fp16": (lambda: _bnb4("nf4", True, torch.float16), torch.float32),
    "nf4-dq-bf16-x_bf16": (lambda: _bnb4("nf4", True, torch.bfloat16), torch.bfloat16),
    "fp4-fp32": (lambda: _bnb4("fp4"), torch.float32),
    "fp4-dq-bf16": (lambda: _bnb4("fp4", True, torch.bfloat16), torch.float32),
    "int8": (_bnb8, torch.float32),
    "int8-x_bf16": (_bnb8, torch.bfloat16),
    "torchao-nf4-bf16": (lambda: _nf4(torch.bfloat16), torch.bfloat16),
    "torchao-nf4-fp32": (lambda: _nf4(torch.float32), torch.float32),
}
KINDS = ("lora", "parallel", "series_in", "series_out")


def _layer(kind: str, base: nn.Module, dropout: float) -> nn.Module:
    torch.manual_seed(1)
    if kind == "lora":
        return LoraLinear(base, R, 8, dropout, init_lora_weights=False)
    placement = {"parallel": "parallel", "series_in": "input", "series_out": "output"}[kind]
    return BottleneckAdapter(base, 6, placement, "tanh", dropout, scaling=2.0, use_bias=True)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _adapter_params(layer):
    if isinstance(layer, LoraLinear):
        return [layer.lora_A.weight, layer.lora_B.weight]
    return [layer.adapter_down.weight, layer.adapter_up.weight, layer.adapter_down.bias,
            layer.adapter_up.bias]


def _reference(kind, layer, base, x, mask, p, dtype):
    """The layer's output computed op by op in `dtype` (float64: the reference, on the
    dequantized weight; x's dtype: eager PyTorch on the quantized layer), with the keep-mask."""
    inv_keep = dropout_threshold(p)[1] if p > 0 else 1.0

    def drop(t):
        return t * mask.to(t.dtype) * inv_keep if p > 0 else t

    prm = [t.detach().to(dtype).requires_grad_(True) for t in _adapter_params(layer)]
    if kind == "lora":
        a, b = prm
        return base(x) + layer.scaling * drop(x) @ a.t() @ b.t(), prm
    dn, up, dnb, upb = prm

    def branch(t):
        return 2.0 * torch.tanh(drop(t) @ dn.t() + dnb) @ up.t() + upb

    if kind == "parallel":
        return base(x) + branch(x), prm
    if kind == "series_in":
        return base(x + branch(x)), prm
    h = base(x)
    return h + branch(h), prm


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(BASES))
def test_matches_float64_on_dequantized_weight(name, kind, p):
    build, xdtype = BASES[name]
    base = build()
    fmt = _quant.quant_format(base)
    assert fmt is not None
    w = _quant.dequantized_weight(base, fmt).double()
    bias = None if base.bias is None else base.bias.detach().double()
    layer = _layer(kind, base, p).train()
    assert layer.quant == fmt
    for t in _adapter_params(layer):
        assert t.dtype == torch.float32  # adapter weights stay float32 on a quantized base
    torch.manual_seed(2)
    x = torch.randn(2, 3, K, dtype=xdtype).requires_grad_(True)
    g = torch.randn(2, 3, N, dtype=xdtype)
    x64 = x.detach().double().requires_grad_(True)

    # the base layer's own error against the float64 product, output and dx
    xb = x.detach().clone().requires_grad_(True)
    y_base = base(xb)
    y_base.backward(g)
    ref_base = x64.detach() @ w.t() + (0 if bias is None else bias)
    err_base = _rel(y_base, ref_base)
    err_base_dx = _rel(xb.grad, g.double() @ w)

    torch.manual_seed(3)
    seed = ops.new_seed().item()
    torch.manual_seed(3)
    y = layer(x)
    assert y.dtype == xdtype and y.shape == (2, 3, N)
    y.backward(g)
    shape = (6, N) if kind == "series_out" else (6, K)
    mask = ops.dropout_mask(shape, p, seed, backend="torch").view(2, 3, -1) if p else None

    def base64(t):
        return t @ w.t() + (0 if bias is None else bias)

    y_ref, prm = _reference(kind, layer, base64, x64, mask, p, torch.float64)
    y_ref.backward(g.double())
    # eager PyTorch on the same quantized layer, same dtypes: the adapter gradients' own
    # rounding (for LoRA and parallel they do not pass through the base weight at all)
    xe = x.detach().clone().requires_grad_(True)
    y_eager, prm_eager = _reference(kind, layer, base, xe, mask, p, xdtype)
    y_eager.backward(g)
    tol = 2 * max(err_base, _rel(y_eager, y_ref))
    tol_dx = 2 * max(err_base_dx, _rel(xe.grad, x64.grad))
    err = _rel(y, y_ref.detach())
    assert err <= tol, (name, kind, err, err_base)
    err_dx = _rel(x.grad, x64.grad)
    assert err_dx <= tol_dx, (name, kind, err_dx, err_base_dx)
    for t, e, r in zip(_adapter_params(layer), prm_eager, prm):
        assert t.grad is not None and t.grad.dtype == torch.float32
        tol_g = 2 * max(err_base, _rel(e.grad, r.grad))
        assert _rel(t.grad, r.grad) <= tol_g, (name, kind, _rel(t.grad, r.grad), tol_g)


@pytest.mark.parametrize("name", ["nf4-bf16", "fp4-dq-bf16", "int8", "torchao-nf4-bf16"])
def test_lora_at_init_leaves_the_quantized_output_unchanged(name):
    build, xdtype = BASES[name]
    base = build()
    x = torch.randn(5, K, dtype=xdtype)
    y0 = base(x)
    layer = LoraLinear(base, R, 16, 0.1).train()
    assert torch.equal(layer(x), y0)  # B = 0: the branch adds exact zeros into y0


class QuantLinear(nn.Module):
    """A GPTQ-style layer: packed integer weights, no float weight."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = K, N
        self.register_buffer("qweight", torch.zeros(K // 8, N, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(1, N // 8, dtype=torch.int32))


class AwqLinear(nn.Linear):
    pass


AwqLinear.__module__ = "awq.modules.linear.gemm"


@pytest.mark.parametrize("cls", [QuantLinear, AwqLinear])
def test_unsupported_quantized_layer_is_a_clear_error(cls):
    base = cls() if cls is QuantLinear else cls(K, N)
    with pytest.raises(TypeError, match=f"{cls.__name__}.*quantized layer format"):
        _quant.quant_format(base)
    if cls is AwqLinear:  # an nn.Linear subclass reaches the adapter layers themselves
        with pytest.raises(TypeError, match="AwqLinear"):
            LoraLinear(base, R, 8)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    base = _bnb4()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ImportError, match=r'pip install "llm_adapters\[qlora\]"'):
        _quant.dequantized_weight(base, _quant.BNB_4BIT)


def test_importing_the_package_imports_neither_bitsandbytes_nor_torchao():
    code = ("import sys, llm_adapters, llm_adapters.layers, llm_adapters.models; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('bitsandbytes', 'torchao')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_lora_add_asked_on_a_backend_without_it_is_an_error():
    x, y0 = torch.randn(3, 8), torch.randn(3, 6)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ops.BackendUnavailableError, match="torch backend on every device"):
        ops.lora_add(y0, x, a, b, backend="cuda")
    with pytest.raises(TypeError, match="y0 dtype"):
        ops.lora_add(y0.double(), x, a, b)
    with pytest.raises(ValueError, match="y0 has shape"):
        ops.lora_add(y0[:, :5], x, a, b)
