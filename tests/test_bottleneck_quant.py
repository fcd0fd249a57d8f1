"""The parallel adapter reads its projections inside the FSDP units that own them, on a quantized
base as on a float one.

PEFT's FSDP wrap policy makes `adapter_down` and `adapter_up` units of their own; outside such
a unit's forward its weight is a 1-D local shard. `FlatUnit` stands in for FSDP1
(`use_orig_params=True`): the wrapped Linear's weight is a 1-D slice of a flat parameter except
during the unit's own forward, where it is the whole [out, in] view (gradients reach the flat
parameter through it). The adapter must give the same output and gradients wrapped as bare.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llm_adapters import ops
from llm_adapters.layers import BottleneckAdapter, _sharded

K, N, R, M = 72, 40, 6, 11


class FlatUnit(nn.Module):
    """A Linear whose weight is whole only inside this unit's forward (as FSDP1 shards it)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.shape = tuple(linear.weight.shape)
        self.flat = nn.Parameter(linear.weight.detach().reshape(-1).clone())
        del linear.weight
        self.module = linear
        self._reshard()

    def _reshard(self) -> None:
        self.module.weight = self.flat[: self.flat.numel() // 2]  # this rank's shard, 1-D

    def forward(self, *args, **kwargs):
        self.module.weight = self.flat.view(self.shape)
        try:
            return self.module(*args, **kwargs)
        finally:
            self._reshard()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "module" not in self._modules:
                raise
            return getattr(self._modules["module"], name)


def _bnb4(lin: nn.Linear) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True,
                          compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def _adapter(base: str) -> BottleneckAdapter:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    layer = _bnb4(lin) if base == "nf4" else lin.requires_grad_(False)
    adapter = BottleneckAdapter(layer, R, "parallel", non_linearity="tanh", scaling="learned",
                                use_bias=True)
    with torch.no_grad():  # biases and scale away from their init, so each is exercised
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    assert (adapter.quant is not None) == (base == "nf4")
    return adapter.train()


def _run(adapter, x):
    y = adapter(x)
    (y * torch.linspace(-1, 1, N)).sum().backward()
    return y.detach()


@pytest.mark.parametrize("base", ["nf4", "float"])
def test_parallel_adapter_reads_its_weights_inside_per_leaf_units(base, monkeypatch):
    x = torch.randn(M, K)
    bare = _adapter(base)
    x_ref = x.clone().requires_grad_(True)
    y_ref = _run(bare, x_ref)

    wrapped = copy.deepcopy(bare)
    wrapped.zero_grad(set_to_none=True)
    wrapped.adapter_down = FlatUnit(wrapped.adapter_down)
    wrapped.adapter_up = FlatUnit(wrapped.adapter_up)
    # what `within_units` recognises as an FSDP1 unit / FSDP2 module
    monkeypatch.setattr(_sharded, "_FSDP_CLASSES", (FlatUnit, type("NoFSDP2", (), {})))
    # outside the units the weights are shards: an op reading them there fails
    assert wrapped.adapter_down.weight.dim() == 1
    with pytest.raises(ValueError, match="2-D"):
        ops.lora_add(torch.zeros(M, N), x, wrapped.adapter_down.weight,
                     wrapped.adapter_up.weight)

    xw = x.clone().requires_grad_(True)
    y = _run(wrapped, xw)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xw.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    for name in ("adapter_down", "adapter_up"):
        ref, unit = getattr(bare, name), getattr(wrapped, name)
        torch.testing.assert_close(unit.flat.grad.view(unit.shape), ref.weight.grad,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(unit.module.bias.grad, ref.bias.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapped.adapter_scale.grad, bare.adapter_scale.grad,
                               rtol=1e-6, atol=1e-6)
    assert wrapped.adapter_down.weight.dim() == 1  # resharded after forward


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("base", ["nf4", "float"])
def test_lora_reads_its_weights_inside_per_leaf_units(base, use_dora, monkeypatch):
    from llm_adapters.layers import LoraLinear

    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    layer = _bnb4(lin) if base == "nf4" else lin.requires_grad_(False)
    bare = LoraLinear(layer, R, 2 * R, init_lora_weights=False, use_dora=use_dora).train()
    assert (bare.quant is not None) == (base == "nf4")
    x = torch.randn(M, K)
    x_ref = x.clone().requires_grad_(True)
    y_ref = _run(bare, x_ref)

    wrapped = copy.deepcopy(bare)
    wrapped.zero_grad(set_to_none=True)
    wrapped.lora_A = FlatUnit(wrapped.lora_A)
    wrapped.lora_B = FlatUnit(wrapped.lora_B)
    monkeypatch.setattr(_sharded, "_FSDP_CLASSES", (FlatUnit, type("NoFSDP2", (), {})))
    assert wrapped.lora_A.weight.dim() == 1
    xw = x.clone().requires_grad_(True)
    y = _run(wrapped, xw)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xw.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    for name in ("lora_A", "lora_B"):
        ref, unit = getattr(bare, name), getattr(wrapped, name)
        torch.testing.assert_close(unit.flat.grad.view(unit.shape), ref.weight.grad,
                                   rtol=1e-6, atol=1e-6)
    assert wrapped.lora_A.weight.dim() == 1
