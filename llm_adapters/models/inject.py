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
from ..layers._quant import adapter_factory, quant_format
from ..layers.lora import EXTRA_PREFIX, LoraBranch
from .adapter_model import AdapterModel
from .saved_modules import SavedModule, saved_module_matches
from .targets import (
    INPUT_SIDE,
    PREFIX_UNSUPPORTED,
    attention_geometry,
    default_target_modules,
    model_type,
)

# The layer classes injection puts in place of a base Linear (each wraps it as `base_layer`).
# `SavedModule` wraps a module of `modules_to_save` the same way (its trained copy beside it).
ADAPTER_LAYERS = (LoraLinear, BottleneckAdapter, SavedModule)
ALL_LINEAR = "all-linear"  # PEFT's shorthand target: every Linear but the output layer


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
    """An adapter layer's own parameters (its default adapter's), without those of the base
    layer it wraps or of other named adapters (`LoraLinear.lora_extra`)."""
    for pname, p in layer.named_parameters():
        if not pname.startswith(("base_layer.", EXTRA_PREFIX)):
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


def _layer_index_ok(name: str, config: LoraConfig) -> bool:
    """PEFT's `layers_to_transform` rule: the first number after the layer list's name (or
    after any dotted name when `layers_pattern` is not set) must be a chosen index."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def _under_saved_module(name: str, config: AdapterConfig) -> bool:
    """A module named in (or inside one of) `modules_to_save` never gets LoRA, as in PEFT."""
    saved = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved)


def _base_weight_problem(module: nn.Module) -> Optional[str]:
    """Why no adapter can wrap this Linear's weight (quantized in a layout we do not run on,
    not a plain float tensor), or None."""
    if quant_format(module) is not None:  # a quantized base LoraLinear runs on
        return None
    weight = getattr(module, "weight", None)
    plain = (
        isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
        and type(weight) in (nn.Parameter, torch.Tensor)
    )
    if plain:
        return None
    dtype = getattr(weight, "dtype", None)
    return (
        f"a {type(module).__module__.split('.')[0]} {type(module).__name__} with a "
        f"{type(weight).__name__} weight ({dtype}): this quantized layout is not supported"
    )


def _all_linear(model: nn.Module) -> list[str]:
    """PEFT's 'all-linear': every Linear / Conv1D except the output embedding."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out is not None else None
    return [n for n, m in model.named_modules() if n and is_adaptable(m) and m is not out]


def _init_lora(layer: LoraLinear, init) -> None:
    """Initial A and B for PEFT's init_lora_weights variants that leave the base untouched."""
    a, b = layer.lora_A.weight, layer.lora_B.weight
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1 / layer.r)
            nn.init.zeros_(b)
        elif init == "orthogonal":  # B A = 0: A and B from disjoint rows of one orthogonal Q
            q, _ = torch.linalg.qr(torch.randn(layer.r, layer.r))
            a.copy_(torch.randn(layer.in_features, layer.r // 2).mm(q[0::2]).T / 10.0)
            b.copy_(torch.randn(layer.r // 2, layer.out_features).T.mm(q[1::2]) / 10.0)


def _adapter_layer(
    module: nn.Module, name: str, config: AdapterConfig, kind: str
) -> nn.Module:
    """The adapter layer that wraps `module` (full name `name`) for `config`."""
    attr = name.rpartition(".")[2]
    if isinstance(config, LoraConfig):
        init = config.init_lora_weights
        layer = LoraLinear(
            module, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
            config.use_rslora, init is not False, use_dora=config.use_dora,
        )
        _init_lora(layer, init)
        layer.reset_magnitude()  # DoRA: m = ‖W + s·B A‖ of the initial A, B (as PEFT)
        return layer
    if kind == "series":
        placement = "input" if attr in INPUT_SIDE else "output"
    else:
        placement = "output" if kind == "adapterp" else "parallel"
    return BottleneckAdapter(
        module, config.bottleneck_size, placement, config.non_linearity,
        config.adapter_dropout, config.scaling, config.init_weights, config.use_bias,
    )


def _resolve_targets(model: nn.Module, config: AdapterConfig, kind: str):
    targets = config.target_modules or default_target_modules(model_type(model), kind)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        if not isinstance(config, LoraConfig):
            raise ValueError("target_modules='all-linear' is for LoRA; name the modules")
        targets = _all_linear(model)
    return targets


def _saved_module_swaps(model: nn.Module, config: AdapterConfig) -> list[Swap]:
    """SavedModule swaps for `modules_to_save` (each entry must name a module)."""
    entries = getattr(config, "modules_to_save", None) or []
    modules = dict(model.named_modules())
    names = [n for n in modules if n and saved_module_matches(n, entries)]
    missing = [e for e in entries if not any(saved_module_matches(n, [e]) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save entry(s) {missing} match no module of this model")
    # the outermost only: a module inside another saved one is saved with it
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    swaps = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        module = modules[name]
        swaps.append(Swap(name, modules[parent_name], attr, module, SavedModule(module)))
    return swaps


def _outside_adapter_layers(modules: dict[str, nn.Module]) -> list[str]:
    """The names of `modules` that are not inside an adapter layer (its base, A, B, ...)."""
    inside = [n for n, m in modules.items() if isinstance(m, ADAPTER_LAYERS)]
    return [n for n in modules if n and not any(n.startswith(o + ".") for o in inside)]


def _held_by(module: nn.Module) -> str:
    """Which named adapter(s) an adapter layer holds, for error messages."""
    if isinstance(module, LoraLinear):
        return f"LoRA adapter(s) {module.adapter_names()}"
    if isinstance(module, BottleneckAdapter):
        return f"bottleneck adapter {module.adapter_name!r} ({module.placement} placement)"
    return "a modules_to_save copy"


def _plan_linear_adapters(
    model: nn.Module, config: AdapterConfig, loading: bool = False, extra: bool = False
) -> list[Swap]:
    """Which modules to replace by what, validated; nothing in `model` changes here.
    Fills in `config.target_modules` with the family default when it was None. `extra`: a
    further named bottleneck adapter of a model that has adapters already, on layers of its
    own (adapters of different kinds do not share a layer)."""
    kind = _config_kind(config)
    lora = isinstance(config, LoraConfig)
    if lora and config.init_lora_weights == "eva" and not loading:
        raise ValueError(
            "init_lora_weights='eva' is not supported for new adapters: EVA initialises from "
            "activations over data (PEFT's initialize_lora_eva_weights); adapters trained with "
            "EVA load fine"
        )
    targets = _resolve_targets(model, config, kind)
    config.target_modules = targets
    existing = next(adapter_modules(model), None)
    if existing is not None and not extra:
        raise ValueError(
            f"the model already has adapters (at {existing[0]!r}); unload them first "
            "(llm_adapters.unload_adapter)"
        )
    modules = dict(model.named_modules())
    names = _outside_adapter_layers(modules) if extra else [n for n in modules if n]
    matched = [name for name in names if _matches(name, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(_matches(n, [t]) for n in matched)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if is_adaptable(m)})
            raise ValueError(
                f"target module(s) {missing} not found in this {model_type(model)} model; "
                f"its Linear layers are named: {', '.join(linear)}"
            )
    chosen = matched
    if lora:
        exclude = config.exclude_modules
        chosen = [
            n for n in matched
            if not (exclude and _matches(n, exclude)) and not _under_saved_module(n, config)
            and _layer_index_ok(n, config)
        ]
    if not chosen:
        raise ValueError(
            f"target_modules {targets!r} matches no module of this model"
            + (" (after exclude_modules / layers_to_transform / modules_to_save)"
               if matched else "")
        )
    swaps = []
    for name in chosen:
        module = modules[name]
        if isinstance(module, ADAPTER_LAYERS):
            raise ValueError(
                f"target_modules: module {name!r} already holds {_held_by(module)}; a layer "
                "holds adapters of one kind, and one bottleneck adapter at most (choose other "
                "target_modules)"
            )
        quant_format(module)  # a quantized layout no adapter can wrap: an error naming it
        if not is_adaptable(module):
            raise ValueError(
                f"target_modules: module {name!r} is a {type(module).__name__}: only nn.Linear "
                "and GPT-2 Conv1D layers can be adapted (LoRA on embeddings or convolutions is "
                "not supported)"
            )
        problem = _base_weight_problem(module)
        if problem:
            raise ValueError(f"target_modules: module {name!r} is {problem}")
        parent_name, _, attr = name.rpartition(".")
        new = _adapter_layer(module, name, config, kind)
        swaps.append(Swap(name, modules[parent_name], attr, module, new))
    if lora:
        swaps += _saved_module_swaps(model, config)
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


def plan_adapters(model: nn.Module, config: AdapterConfig, loading: bool = False) -> Plan:
    """Everything `config` adds to `model`, validated, without touching `model`.
    `loading`: the adapter's weights come from a file (its initialisation does not matter)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an adapter config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdapterModel):
        raise ValueError("the model already has adapters: pass the base model")
    if isinstance(config, (LoraConfig, BottleneckConfig)):
        return Plan(swaps=_plan_linear_adapters(model, config, loading))
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
                if isinstance(m, LoraLinear) and getattr(m.base_layer, "bias", None) is not None
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
    chosen biases) train. On any error the model is left unchanged: a model that already has
    adapters (ours, or a PEFT model) is refused before anything is looked at.
    """
    from .adapter_model import refuse_adapted

    refuse_adapted(model)
    config = dataclasses.replace(config)  # the model gets its own copy, targets resolved
    plan = plan_adapters(model, config)
    wrapper = attach_adapters(model, config, plan)
    if verbose:
        wrapper.print_trainable_parameters()
    return wrapper


# ---- other named LoRA adapters (PEFT's add_adapter) ----------------------------------------
@dataclass
class ExtraSwap:
    """Adapter branch `branch` goes into the LoraLinear at `name`: `layer`, which is either
    already in the model (`parent` None) or wraps `parent.attr` when applied."""

    name: str
    layer: LoraLinear
    branch: LoraBranch
    parent: Optional[nn.Module] = None
    attr: str = ""


def plan_extra_lora(model: nn.Module, config: LoraConfig, loading: bool = False) -> list[ExtraSwap]:
    """Where another named LoRA (or DoRA) adapter goes in `model` (a causal LM that has
    adapter layers already), validated, the model untouched. Fills in `config.target_modules`.
    A new DoRA adapter's magnitude is ‖W + s·B A‖ of each unmerged base weight (PEFT's)."""
    unsupported = [
        (config.bias != "none", f"bias={config.bias!r}"),
        (bool(config.modules_to_save), "modules_to_save"),
        (config.init_lora_weights == "eva" and not loading, "init_lora_weights='eva'"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(
                f"{what} is not supported for an adapter other than 'default' (several "
                "adapters per model: LoRA or DoRA adapters with no trained base parameters for "
                "the others)"
            )
    targets = _resolve_targets(model, config, "lora")
    modules = dict(model.named_modules())
    matched = [n for n in _outside_adapter_layers(modules) if _matches(n, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(_matches(n, [t]) for n in matched)]
        if missing:
            raise ValueError(f"target module(s) {missing} not found in this model")
    exclude = config.exclude_modules
    chosen = [
        n for n in matched
        if not (exclude and _matches(n, exclude)) and _layer_index_ok(n, config)
    ]
    if not chosen:
        raise ValueError(f"target_modules {targets!r} matches no module of this model")
    swaps = []
    for name in chosen:
        module = modules[name]
        if isinstance(module, LoraLinear):
            base, layer, parent, attr = module.base_layer, module, None, ""
        elif isinstance(module, ADAPTER_LAYERS):
            raise ValueError(
                f"target_modules: module {name!r} already holds {_held_by(module)}; only a "
                "LoRA layer can take another LoRA adapter (adapters of different kinds go on "
                "different layers)"
            )
        else:
            quant_format(module)
            if not is_adaptable(module):
                raise ValueError(
                    f"target_modules: module {name!r} is a {type(module).__name__}: only "
                    "nn.Linear and GPT-2 Conv1D layers can be adapted"
                )
            problem = _base_weight_problem(module)
            if problem:
                raise ValueError(f"target_modules: module {name!r} is {problem}")
            parent_name, _, attr = name.rpartition(".")
            base, layer, parent = module, None, modules[parent_name]
        init = config.init_lora_weights
        if layer is None:
            layer = LoraLinear.without_default(base)
        k, n = layer.in_features, layer.out_features
        branch = LoraBranch(
            k, n, config.rank_for(name), config.alpha_for(name), config.lora_dropout,
            config.use_rslora, init is not False, adapter_factory(base), config.use_dora,
        )
        _init_lora(branch, init)
        if not loading:  # DoRA: m = ‖W + s·B A‖ of the initial A, B (as PEFT); loaded: saved
            layer.init_branch_magnitude(branch)
        swaps.append(ExtraSwap(name, layer, branch, parent, attr))
    return swaps


def attach_extra_lora(
    swaps: list[ExtraSwap], adapter_name: str, active: str
) -> None:
    """Apply a plan from `plan_extra_lora` (nothing here can fail); the new adapter's
    parameters are frozen (it is not the active one) and its layers follow `active`."""
    for swap in swaps:
        for p in swap.branch.parameters():
            p.requires_grad_(False)
        swap.layer.add_branch(adapter_name, swap.branch)
        if swap.parent is not None:
            for p in swap.layer.base_layer.parameters():
                p.requires_grad_(False)
            swap.layer.active_adapter = active
            setattr(swap.parent, swap.attr, swap.layer)


# ---- other named bottleneck adapters (adapters of different kinds side by side) ------------
def plan_extra_bottleneck(
    model: nn.Module, config: BottleneckConfig, loading: bool = False
) -> list[Swap]:
    """Where another named bottleneck adapter goes in `model` (a causal LM that has adapter
    layers already): on Linear layers no other adapter holds, validated, the model untouched.
    Fills in `config.target_modules` with the family default when it was None."""
    return _plan_linear_adapters(model, config, loading, extra=True)


def attach_extra_bottleneck(
    swaps: list[Swap], adapter_name: str, active: list[str], disabled: bool
) -> None:
    """Apply a plan from `plan_extra_bottleneck` (nothing here can fail): each new layer
    belongs to `adapter_name`, runs only while that adapter is in `active`, and its parameters
    train only then (a new adapter is not active, as in PEFT, so they start frozen)."""
    for swap in swaps:
        layer = swap.new
        layer.adapter_name = adapter_name
        layer.active = adapter_name in active
        layer.disable_adapters = disabled
        for _, p in own_parameters(layer):
            p.requires_grad_(False)
        setattr(swap.parent, swap.attr, layer)
