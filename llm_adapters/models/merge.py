"""Merging LoRA into the base weights, and unloading adapters to get the base model back."""

from __future__ import annotations

from torch import nn

from ..layers import LoraLinear
from ..layers._quant import check_requantizable
from .adapter_model import AdapterModel
from .inject import adapter_modules
from .saved_modules import SavedModule


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    base = model.get_base_model() if isinstance(model, AdapterModel) else model
    layers = [m for _, m in adapter_modules(base) if isinstance(m, LoraLinear)]
    others = [
        n for n, m in adapter_modules(base) if not isinstance(m, (LoraLinear, SavedModule))
    ]
    if others:
        raise ValueError(
            f"only LoRA adapters can be merged; {others[0]!r} is a bottleneck adapter, whose "
            "non-linear branch has no weight to merge into"
        )
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    return layers


def merge_adapter(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (W += s·B A); forward then skips the branch.

    A quantized base weight is dequantized, updated and re-quantized in its own format (a
    UserWarning says it is lossy); what that needs is checked for every layer first, so an
    error leaves the model untouched."""
    layers = _lora_layers(model)
    for layer in layers:
        if layer.quant is not None and not layer.merged:
            check_requantizable(layer.base_layer, layer.quant)
    for layer in layers:
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter` (W -= s·B A; on a quantized base, re-quantized again: lossy)."""
    layers = _lora_layers(model)
    for layer in layers:
        if layer.quant is not None and layer.merged:
            check_requantizable(layer.base_layer, layer.quant)
    for layer in layers:
        layer.unmerge()


def unload_adapter(model: AdapterModel, merge: bool = False) -> nn.Module:
    """Remove the adapters (merging LoRA first if `merge`), restoring the base model's modules
    and its parameters' requires_grad flags; returns the base model."""
    if not isinstance(model, AdapterModel):
        raise TypeError("unload_adapter expects the model returned by get_adapter_model")
    base = model.get_base_model()
    if merge:
        merge_adapter(model)
    modules = dict(base.named_modules())
    for name, module in list(adapter_modules(base)):
        if isinstance(module, LoraLinear) and module.merged and not merge:
            module.unmerge()
        parent_name, _, attr = name.rpartition(".")
        # a modules_to_save module: merged, its trained copy replaces it (as in PEFT)
        keep = module.trained if merge and isinstance(module, SavedModule) else module.base_layer
        setattr(modules[parent_name], attr, keep)
    for name, p in base.named_parameters():
        p.requires_grad_(model._frozen_state.get(name, p.requires_grad))
    for module in base.modules():
        if "_can_checkpoint_with_cache" in vars(module):
            del module._can_checkpoint_with_cache
    return base
