"""A bitsandbytes 4-bit base after an evaluation on CPU: bitsandbytes may repack the weight for
an inference kernel without autograd (CPUs with AVX512-BF16). Dequantizing (merge) and
training through such a layer must still see the true weight."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from llm_adapters.layers._quant import BNB_4BIT, dequantized_weight  # noqa: E402


def _layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 64, bias=False)
    q = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return q.to("cpu")


def test_dequantized_weight_of_a_repacked_layer_is_the_true_weight():
    q = _layer()
    ref = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float().clone()
    x = torch.randn(3, 128)
    q.eval()
    with torch.no_grad():
        q(x)  # may repack on this CPU
    repacked = bool(getattr(q.weight.quant_state, "packing_format_for_cpu", False))
    w = dequantized_weight(q, BNB_4BIT)
    assert w.shape == ref.shape
    # bitsandbytes rounds absmax to bf16 when it repacks: that much moves, no more
    tol = 1e-2 * ref.abs().max().item() if repacked else 0.0
    assert (w - ref).abs().max().item() <= tol
    # and the layer is back on its autograd kernel: a gradient flows through it
    q.train()
    xg = torch.randn(3, 128, requires_grad=True)
    q(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
