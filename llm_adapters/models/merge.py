"""Merging LoRA into the base weights, and unloading adapters to get the base model back."""

from __future__ import annotations

from torch import nn

from ..layers import LoraLinear
from .adapter_model import AdapterModel
from .inject import adapter_modules


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    base = model.base_model if isinstance(model, AdapterModel) else model
    layers = [m for _, m in adapter_modules(base) if isinstance(m, LoraLinear)]
    others = [n for n, m in adapter_modules(base) if not isinstance(m, LoraLinear)]
    if others:
        raise ValueError(
            f"only LoRA adapters can be merged; {others[0]!r} is a bottleneck adapter, whose "
            "non-linear branch has no weight to merge into"
        )
    if not layers:
        raise ValueError("the model has no LoRA layers to merge")
    return layers


def merge_adapter(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (W += s·B A); forward then skips the branch."""
    for layer in _lora_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter` (W -= s·B A)."""
    for layer in _lora_layers(model):
        layer.unmerge()


def unload_adapter(model: AdapterModel, merge: bool = False) -> nn.Module:
    """Remove the adapters (merging LoRA first if `merge`), restoring the base model's modules
    and its parameters' requires_grad flags; returns the base model."""
    if not isinstance(model, AdapterModel):
        raise TypeError("unload_adapter expects the model returned by get_adapter_model")
    base = model.base_model
    if merge:
        merge_adapter(model)
    modules = dict(base.named_modules())
    for name, module in list(adapter_modules(base)):
        if isinstance(module, LoraLinear) and module.merged and not merge:
            module.unmerge()
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name], attr, module.base_layer)
    for name, p in base.named_parameters():
        p.requires_grad_(model._frozen_state.get(name, p.requires_grad))
    for module in base.modules():
        if "_can_checkpoint_with_cache" in vars(module):
            del module._can_checkpoint_with_cache
    return base
