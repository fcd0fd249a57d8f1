"""Planning and attaching adapters: one routine for every family and every adapter kind.

Injection is planned first (`plan_adapters`: which modules to replace by what, every check
run, the model untouched) and applied only when the whole plan is valid (`attach_adapters`),
so a bad target, a config that does not fit or an adapter file that does not match leaves the
model exactly as it was. Loading an adapter goes through the same two steps.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..config import (
    AdapterConfig,
    BottleneckConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from ..layers import BottleneckAdapter, LoraLinear, PrefixEncoder, PromptEmbedding, is_adaptable
from .adapter_model import AdapterModel
from .targets import (
    INPUT_SIDE,
    PREFIX_UNSUPPORTED,
    attention_geometry,
    default_target_modules,
    model_type,
)

# The layer classes injection puts in place of a base Linear (each wraps it as `base_layer`).
ADAPTER_LAYERS = (LoraLinear, BottleneckAdapter)


@dataclass
class Swap:
    """One module replacement: `parent.attr` (full name `name`) goes from `old` to `new`."""

    name: str
    parent: nn.Module
    attr: str
    old: nn.Module
    new: nn.Module


@dataclass
class Plan:
    """Everything a config adds to a model, built without touching it."""

    swaps: list[Swap] = field(default_factory=list)
    soft: Optional[nn.Module] = None  # the PrefixEncoder or PromptEmbedding


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every adapter layer inside `model`, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, ADAPTER_LAYERS):
            yield name, module


def own_parameters(layer: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """An adapter layer's own parameters, without those of the base layer it wraps."""
    for pname, p in layer.named_parameters():
        if not pname.startswith("base_layer."):
            yield pname, p


def _config_kind(config: AdapterConfig) -> str:
    if isinstance(config, LoraConfig):
        return "lora"
    if isinstance(config, BottleneckConfig):
        return config.placement
    raise TypeError(f"{type(config).__name__} does not target Linear layers")


def _matches(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):  # a single string is a regular expression, as in PEFT
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _adapter_layer(module: nn.Module, attr: str, config: AdapterConfig, kind: str) -> nn.Module:
    """The adapter layer that wraps `module` (named `attr` in its parent) for `config`."""
    if isinstance(config, LoraConfig):
        return LoraLinear(
            module, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
            config.init_lora_weights,
        )
    if kind == "series":
        placement = "input" if attr in INPUT_SIDE else "output"
    else:
        placement = "output" if kind == "adapterp" else "parallel"
    return BottleneckAdapter(
        module, config.bottleneck_size, placement, config.non_linearity,
        config.adapter_dropout, config.scaling, config.init_weights, config.use_bias,
    )


def _plan_linear_adapters(model: nn.Module, config: AdapterConfig) -> list[Swap]:
    """Which modules to replace by what, validated; nothing in `model` changes here.
    Fills in `config.target_modules` with the family default when it was None."""
    kind = _config_kind(config)
    targets = config.target_modules or default_target_modules(model_type(model), kind)
    config.target_modules = targets
    existing = next(adapter_modules(model), None)
    if existing is not None:
        raise ValueError(
            f"the model already has adapters (at {existing[0]!r}); unload them first "
            "(llm_adapters.unload_adapter)"
        )
    modules = dict(model.named_modules())
    chosen = [name for name in modules if name and _matches(name, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if is_adaptable(m)})
            raise ValueError(
                f"target module(s) {missing} not found in this {model_type(model)} model; "
                f"its Linear layers are named: {', '.join(linear)}"
            )
    if not chosen:
        raise ValueError(f"target_modules {targets!r} matches no module of this model")
    swaps = []
    for name in chosen:
        module = modules[name]
        if not is_adaptable(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}: only nn.Linear and "
                "GPT-2 Conv1D layers can be adapted"
            )
        parent_name, _, attr = name.rpartition(".")
        new = _adapter_layer(module, attr, config, kind)
        swaps.append(Swap(name, modules[parent_name], attr, module, new))
    return swaps


def _check_soft_prompt_fits(model: nn.Module, config: AdapterConfig) -> None:
    if isinstance(config, PrefixTuningConfig):
        attention_geometry(model)
        if model_type(model) in PREFIX_UNSUPPORTED:
            raise ValueError(
                f"prefix tuning is not supported for {model_type(model)}: its attention does "
                "not take key/value prefixes through the cache interface"
            )
    if getattr(model, "get_input_embeddings", None) is None or model.get_input_embeddings() is None:
        raise ValueError("prompt/prefix tuning needs a model with input embeddings")


def _soft_module(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """The PrefixEncoder or PromptEmbedding for `config`, on the embedding's device."""
    _check_soft_prompt_fits(model, config)
    weight = model.get_input_embeddings().weight
    factory = {"device": weight.device}
    if isinstance(config, PrefixTuningConfig):
        layers, kv, head_dim, hidden = attention_geometry(model)
        return PrefixEncoder(
            config.num_virtual_tokens, layers, kv, head_dim, hidden, config.prefix_projection,
            config.encoder_hidden_size,
        ).to(**factory)
    init = None
    if config.init_from_vocab:
        rows = torch.randint(0, weight.shape[0], (config.num_virtual_tokens,))
        init = weight.detach()[rows.to(weight.device)].float()
    return PromptEmbedding(config.num_virtual_tokens, weight.shape[1], init).to(**factory)


def plan_adapters(model: nn.Module, config: AdapterConfig) -> Plan:
    """Everything `config` adds to `model`, validated, without touching `model`."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an adapter config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdapterModel):
        raise ValueError("the model already has adapters: pass the base model")
    if isinstance(config, (LoraConfig, BottleneckConfig)):
        return Plan(swaps=_plan_linear_adapters(model, config))
    return Plan(soft=_soft_module(model, config))


def _freeze_base(wrapper: AdapterModel, config: AdapterConfig) -> None:
    base = wrapper.base_model
    for p in base.parameters():
        p.requires_grad_(False)
    for _, module in adapter_modules(base):
        for _, p in own_parameters(module):
            p.requires_grad_(True)
    if isinstance(config, LoraConfig) and config.bias != "none":
        if config.bias == "all":
            biases = [p for n, p in base.named_parameters() if n.endswith("bias")]
        else:
            biases = [
                m.base_layer.bias for _, m in adapter_modules(base)
                if getattr(m.base_layer, "bias", None) is not None
            ]
        for p in biases:
            p.requires_grad_(True)


def attach_adapters(model: nn.Module, config: AdapterConfig, plan: Plan) -> AdapterModel:
    """Apply a plan from `plan_adapters` (nothing here can fail) and wrap the model."""
    wrapper = AdapterModel(model, config)
    wrapper._frozen_state = {n: p.requires_grad for n, p in model.named_parameters()}
    for swap in plan.swaps:
        setattr(swap.parent, swap.attr, swap.new)
    if isinstance(config, PrefixTuningConfig):
        wrapper.prefix_encoder = plan.soft
        # The prefix cache is read-only, so checkpointed layers may keep it in the replay.
        for module in model.modules():
            if hasattr(type(module), "_can_checkpoint_with_cache"):
                module._can_checkpoint_with_cache = True
    elif isinstance(config, PromptTuningConfig):
        wrapper.prompt_embedding = plan.soft
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        config.base_model_name_or_path = name or None
    _freeze_base(wrapper, config)
    return wrapper


def get_adapter_model(
    model: nn.Module, config: AdapterConfig, verbose: bool = False
) -> AdapterModel:
    """Add the adapters described by `config` to a Hugging Face model (in place) and wrap it.

    The base model is frozen; only adapter parameters (and, for LoRA with `bias != "none"`, the
    chosen biases) train. On any error the model is left unchanged.
    """
    config = dataclasses.replace(config)  # the model gets its own copy, targets resolved
    plan = plan_adapters(model, config)
    wrapper = attach_adapters(model, config, plan)
    if verbose:
        wrapper.print_trainable_parameters()
    return wrapper
