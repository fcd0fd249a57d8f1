"""Running a PEFT LoRA model on our fused op, without converting it.

`accelerate_peft` swaps only each PEFT LoRA Linear's forward, so the model stays a PEFT model
(its parameters, optimizer state, saving and methods untouched); `restore_peft` undoes it.
"""

from __future__ import annotations

import types
from typing import Any

from torch import Tensor, nn

from .. import ops
from ..layers._base import autocast_inputs


def _peft_lora_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Replacement forward for a PEFT LoRA Linear: one fused op instead of PEFT's chain."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (
        args or kwargs or self.disable_adapters or self.merged or len(active) != 1
        or self.use_dora.get(active[0], False)
        or getattr(self, "lora_bias", {}).get(active[0], False)
    ):
        return self._llm_adapters_original_forward(x, *args, **kwargs)
    name = active[0]
    base = self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight
    dropout = self.lora_dropout[name]
    p = float(getattr(dropout, "p", 0.0)) if self.training else 0.0
    x, weight, bias = autocast_inputs(x, weight, base.bias)
    return ops.lora_linear(
        x, weight, bias, self.lora_A[name].weight, self.lora_B[name].weight,
        scaling=float(self.scaling[name]), dropout_p=p,
    )


def accelerate_peft(peft_model: nn.Module) -> nn.Module:
    """Switch a PEFT LoRA model's Linear layers onto our fused op, in place.

    The same modules and parameters stay (optimizer state, saving and PEFT's own methods are
    untouched); only each LoRA Linear's forward changes. Layers using features our op does
    not cover (DoRA, several active adapters, mixed-batch adapter names) keep PEFT's forward.
    Returns the model; `restore_peft` undoes it.
    """
    try:
        from peft.tuners.lora.layer import Linear as PeftLoraLinear
    except ImportError as exc:  # pragma: no cover - peft is optional
        raise ImportError("accelerate_peft needs peft installed") from exc
    count = 0
    for module in peft_model.modules():
        patched = "_llm_adapters_original_forward" in vars(module)
        if isinstance(module, PeftLoraLinear) and not patched:
            module._llm_adapters_original_forward = module.forward
            module.forward = types.MethodType(_peft_lora_forward, module)
            count += 1
    if count == 0:
        raise ValueError("accelerate_peft found no PEFT LoRA Linear layer in this model")
    return peft_model


def restore_peft(peft_model: nn.Module) -> nn.Module:
    """Undo `accelerate_peft`."""
    for module in peft_model.modules():
        if "_llm_adapters_original_forward" in vars(module):
            del module.forward
            del module._llm_adapters_original_forward
    return peft_model
