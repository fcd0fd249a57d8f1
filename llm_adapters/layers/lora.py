"""LoraLinear: y = base(x) + (alpha / r) · B A D(x), on the fused `ops.lora_linear`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ._base import Conv1D, autocast_inputs, linear_dims
from ._quant import adapter_factory, add_to_quantized, quant_format
from ._sharded import base_weight_bias, within_units


class LoraLinear(nn.Module):
    """Wraps an nn.Linear (or GPT-2 Conv1D) as `base_layer` and adds a rank-r update.

    Parameters live beside the base layer under PEFT's names (`lora_A.weight` [r, K],
    `lora_B.weight` [N, r]) so state dicts map onto PEFT's one-to-one.

    A quantized base (bitsandbytes 4-bit / 8-bit, torchao NF4; `_quant`) keeps its own
    product: forward calls it and adds the branch into its output (`ops.lora_add`), so dx is
    the layer's own backward plus the branch's term. Merging into it re-quantizes (lossy).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
    ) -> None:
        super().__init__()
        k, n = linear_dims(base_layer)
        self.quant = quant_format(base_layer)  # None for a float base
        self.base_layer = base_layer
        self.in_features, self.out_features = k, n
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_dropout = float(lora_dropout)
        factory = adapter_factory(base_layer)
        self.lora_A = nn.Linear(k, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, n, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        self.merged = False
        self.disable_adapters = False

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(Conv1D) and isinstance(self.base_layer, Conv1D)

    def delta_weight(self) -> Tensor:
        """s · B A as [N, K] in float32 (or the adapter's dtype)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        if self.merged:
            return
        if self.quant is not None:
            add_to_quantized(self.base_layer, self.quant, self.delta_weight().detach(), "merging")
            self.merged = True
            return
        w = self.base_layer.weight
        delta = self.delta_weight()
        with torch.no_grad():
            w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        if self.quant is not None:
            add_to_quantized(
                self.base_layer, self.quant, -self.delta_weight().detach(), "unmerging"
            )
            self.merged = False
            return
        w = self.base_layer.weight
        delta = self.delta_weight()
        with torch.no_grad():
            w.sub_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disable_adapters:
            return self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        if self.quant is not None:
            y0 = self.base_layer(x)
            x = x if x.dtype == y0.dtype else x.to(y0.dtype)
            return ops.lora_add(
                y0, x, self.lora_A.weight, self.lora_B.weight, scaling=self.scaling, dropout_p=p
            )

        def fused() -> Tensor:
            xc, w, b = autocast_inputs(x, *base_weight_bias(self.base_layer))
            return ops.lora_linear(
                xc, w, b, self.lora_A.weight, self.lora_B.weight, scaling=self.scaling,
                dropout_p=p,
            )

        # the weights are read inside the FSDP units that own them, if any (see _sharded)
        return within_units((self.base_layer, self.lora_A, self.lora_B), fused)

    def extra_repr(self) -> str:
        quant = f", base={self.quant}" if self.quant else ""
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}{quant}"
