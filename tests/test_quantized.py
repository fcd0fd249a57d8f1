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


def _to_bnb4(lin: nn.Linear, quant_type="nf4", double_quant=False,
             compute_dtype=torch.float32) -> nn.Module:
    """`lin` as a bitsandbytes Linear4bit holding its weight, quantized."""
    bias = lin.bias is not None
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias,
                          compute_dtype=compute_dtype, compress_statistics=double_quant,
                          quant_type=quant_type)
    q.weight = bnb.nn.Params4bit(lin.weight.data.float().clone(), requires_grad=False,
                                 compress_statistics=double_quant, quant_type=quant_type)
    if bias:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def _to_bnb8(lin: nn.Linear) -> nn.Module:
    bias = lin.bias is not None
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias,
                            has_fp16_weights=False)
    q.weight = bnb.nn.Int8Params(lin.weight.data.float().clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _to_nf4(lin: nn.Linear, dtype=torch.bfloat16) -> nn.Module:
    to_nf4 = _quant.require_torchao()
    lin = lin.to(dtype)
    lin.weight = nn.Parameter(to_nf4(lin.weight.data, 32, 1), requires_grad=False)
    return lin


def _linear(k=K, n=N, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias)


def _bnb4(quant_type="nf4", double_quant=False, compute_dtype=torch.float32):
    return _to_bnb4(_linear(), quant_type, double_quant, compute_dtype)


def _bnb8():
    return _to_bnb8(_linear())


def _nf4(dtype=torch.bfloat16):
    return _to_nf4(_linear(bias=False), dtype)


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


def test_lora_add_on_a_backend_that_cannot_run_it_or_bad_y0_is_an_error():
    # every backend implements lora_add; asking for one that cannot run here (cuda for CPU
    # tensors) is an error, never a fallback to another backend
    x, y0 = torch.randn(3, 8), torch.randn(3, 6)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ops.BackendUnavailableError, match="'cuda'"):
        ops.lora_add(y0, x, a, b, backend="cuda")
    with pytest.raises(TypeError, match="y0 dtype"):
        ops.lora_add(y0.double(), x, a, b)
    with pytest.raises(ValueError, match="y0 has shape"):
        ops.lora_add(y0[:, :5], x, a, b)


# ---- models -----------------------------------------------------------------------------------

QUANTIZERS = {
    "nf4": lambda lin: _to_bnb4(lin, "nf4", False, torch.float32),
    "fp4-dq-bf16": lambda lin: _to_bnb4(lin, "fp4", True, torch.bfloat16),
    "int8": _to_bnb8,
    "torchao-nf4": lambda lin: _to_nf4(lin, torch.float32),
}


def quantized_llama(fmt: str = "nf4", seed: int = 0) -> nn.Module:
    """The tiny random LLaMA with every decoder Linear quantized (the LM head stays float),
    as from_pretrained(quantization_config=BitsAndBytesConfig(...)) leaves it."""
    from tiny_models import tiny_model

    model = tiny_model("llama", seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("model.layers."):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, QUANTIZERS[fmt](module))
    return model


def _module(model: nn.Module, suffix: str) -> nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith(suffix))


def _batch():
    from tiny_models import tiny_batch

    return tiny_batch()


@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_adapter_model_on_a_quantized_llama(fmt):
    import llm_adapters as la

    model = quantized_llama(fmt)
    batch = _batch()
    with torch.no_grad():
        before = model(**batch).logits
    wrapped = la.get_adapter_model(model, la.LoraConfig(r=4, lora_alpha=8,
                                                        target_modules=["q_proj", "v_proj"]))
    q = _module(wrapped, "layers.0.self_attn.q_proj")
    assert isinstance(q, LoraLinear) and q.quant is not None
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, before)  # B = 0 at init
    loss = wrapped(**batch).loss
    loss.backward()
    assert q.lora_A.weight.grad is not None and q.lora_B.weight.grad.abs().sum() > 0
    for kind in (la.BottleneckConfig(bottleneck_size=4, use_parallel_adapter=True),
                 la.BottleneckConfig(bottleneck_size=4)):
        m = la.get_adapter_model(quantized_llama(fmt), kind)
        m(**batch).loss.backward()
        grads = [p.grad for p in m.adapter_parameters().values()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_trainable_parameters_counted_as_peft_counts_them():
    import peft

    import llm_adapters as la

    targets = ["q_proj", "v_proj"]
    ours = la.get_adapter_model(quantized_llama("nf4"), la.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    theirs = peft.get_peft_model(quantized_llama("nf4"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    total = ours.get_nb_trainable_parameters()[1]
    assert total > sum(p.numel() for p in ours.parameters())  # 4-bit: two values a byte


def test_prepare_model_for_kbit_training_as_peft():
    import peft

    import llm_adapters as la

    def half(model):
        for n, p in model.named_parameters():
            if p.dtype == torch.float32 and "norm" in n or "embed" in n or "lm_head" in n:
                p.data = p.data.to(torch.bfloat16)
        return model

    ours = la.prepare_model_for_kbit_training(half(quantized_llama("nf4")))
    theirs = half(quantized_llama("nf4"))
    theirs.is_loaded_in_4bit = True  # what from_pretrained sets; PEFT reads it
    theirs = peft.prepare_model_for_kbit_training(theirs)
    a = {n: (p.dtype, p.requires_grad, type(p).__name__) for n, p in ours.named_parameters()}
    b = {n: (p.dtype, p.requires_grad, type(p).__name__) for n, p in theirs.named_parameters()}
    assert a == b
    assert ours.model.norm.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.is_gradient_checkpointing
    ids = _batch()["input_ids"]
    assert ours.get_input_embeddings()(ids).requires_grad  # reentrant checkpointing needs it
    # then LoRA trains under gradient checkpointing
    model = la.get_adapter_model(ours, la.LoraConfig(r=4, lora_alpha=8))
    model.train()
    model(**_batch()).loss.backward()
    assert all(p.grad is not None for p in model.adapter_parameters().values())


@pytest.mark.parametrize("fmt", list(QUANTIZERS))
def test_merge_into_a_quantized_base_requantizes_with_a_warning(fmt):
    import llm_adapters as la

    model = la.get_adapter_model(quantized_llama(fmt), la.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    layer = _module(model, "layers.0.self_attn.q_proj")
    with torch.no_grad():  # an update of trained size: |ΔW| about a tenth of |W|
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.weight.mul_(0.05)
    w_before = _quant.dequantized_weight(layer.base_layer, layer.quant).double()
    delta = layer.delta_weight().detach().double()
    batch = _batch()
    with torch.no_grad():
        y = model(**batch).logits
    with pytest.warns(UserWarning, match="lossy"):
        la.merge_adapter(model)
    w_merged = _quant.dequantized_weight(layer.base_layer, layer.quant).double()
    # the merged weight is W + ΔW rounded to the format once more; the bound is the format's
    # own error on the float weight it was quantized from (measured, times 2), and the same for
    # the logits: merged vs the unmerged adapter, against quantized vs float base model
    from tiny_models import tiny_model

    float_model = tiny_model("llama", 0)
    w_float = float_model.model.layers[0].self_attn.q_proj.weight.detach().double()
    # relative to the weight's largest magnitude: each block is scaled by its absmax
    err_format = ((w_before - w_float).abs().max() / w_float.abs().max()).item()
    err = ((w_merged - (w_before + delta)).abs().max() / (w_before + delta).abs().max()).item()
    assert 0 < err <= 2 * err_format, (fmt, err, err_format)
    assert (w_merged - w_before).abs().max() > 0  # something was merged
    with torch.no_grad():
        y_merged = model(**batch).logits
        y_float = float_model(**batch).logits
        y_quant = quantized_llama(fmt)(**batch).logits
    rel = ((y_merged - y).abs().max() / y.abs().max()).item()
    rel_format = ((y_quant - y_float).abs().max() / y_float.abs().max()).item()
    print(f"merge {fmt}: weight err {err:.3g} (format {err_format:.3g}), "
          f"logits rel {rel:.3g} (format {rel_format:.3g})")
    assert rel <= 2 * rel_format, (fmt, rel, rel_format)
    with pytest.warns(UserWarning, match="lossy"):
        base = la.unload_adapter(model, merge=False)  # unmerges: re-quantized again
    assert _quant.quant_format(base.model.layers[0].self_attn.q_proj) == layer.quant


def test_merge_without_bitsandbytes_leaves_the_model_untouched(monkeypatch):
    import llm_adapters as la

    model = la.get_adapter_model(quantized_llama("nf4"), la.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    before = [m.base_layer.weight.data.clone() for m in layers]
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r'pip install "llm_adapters\[qlora\]"'):
        la.merge_adapter(model)
    assert not any(m.merged for m in layers)
    assert all(torch.equal(m.base_layer.weight.data, w) for m, w in zip(layers, before))


def test_unsupported_quantized_target_leaves_the_model_untouched():
    import llm_adapters as la

    model = quantized_llama("nf4")
    attn = model.model.layers[1].self_attn
    attn.v_proj = QuantLinear()
    names = [n for n, _ in model.named_modules()]
    with pytest.raises(TypeError, match="QuantLinear.*quantized layer format"):
        la.get_adapter_model(model, la.LoraConfig(r=4, lora_alpha=8))
    assert [n for n, _ in model.named_modules()] == names
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
