"""Putting adapters into Hugging Face models: target maps, injection, merge, save/load, PEFT.

One table says which Linear layers each model family adapts; one injection routine serves
every family. Injection is planned first and applied only when the whole plan is valid, so a
bad target, a config that does not fit or an adapter file that does not match leaves the model
exactly as it was.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import ops
from .config import (
    AdapterConfig,
    BottleneckConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    load_config,
)
from .layers import BottleneckAdapter, LoraLinear, PrefixEncoder, PromptEmbedding, is_adaptable

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_LLAMA_LIKE = {
    "lora": ["q_proj", "v_proj"],
    "series": ["gate_proj", "up_proj", "down_proj"],
    "adapterp": ["down_proj"],
    "parallel": ["q_proj", "k_proj", "v_proj"],
}
_FUSED_QKV = {
    "lora": ["query_key_value"],
    "series": ["dense_h_to_4h", "dense_4h_to_h"],
    "adapterp": ["dense_4h_to_h"],
    "parallel": ["query_key_value"],
}
# model_type -> adapter kind -> default target modules. LoRA follows PEFT's defaults, the
# bottleneck kinds LLM-Adapters' (series: the MLP projections; AdapterP: the MLP output
# projection; parallel: the attention projections).
TARGET_MODULES: dict[str, dict[str, list[str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": {
        "lora": ["qkv_proj"],
        "series": ["gate_up_proj", "down_proj"],
        "adapterp": ["down_proj"],
        "parallel": ["qkv_proj"],
    },
    "bloom": _FUSED_QKV,
    "falcon": _FUSED_QKV,
    "gpt_neox": _FUSED_QKV,
    "gptj": {
        "lora": ["q_proj", "v_proj"],
        "series": ["fc_in", "fc_out"],
        "adapterp": ["fc_out"],
        "parallel": ["q_proj", "k_proj", "v_proj"],
    },
    "gpt_neo": {
        "lora": ["q_proj", "v_proj"],
        "series": ["c_fc", "c_proj"],
        "adapterp": ["c_proj"],
        "parallel": ["q_proj", "k_proj", "v_proj"],
    },
    "opt": {
        "lora": ["q_proj", "v_proj"],
        "series": ["fc1", "fc2"],
        "adapterp": ["fc2"],
        "parallel": ["q_proj", "k_proj", "v_proj"],
    },
    "gpt2": {  # Conv1D layers; attention and MLP both have a c_proj, so name the MLP's
        "lora": ["c_attn"],
        "series": ["mlp.c_fc", "mlp.c_proj"],
        "adapterp": ["mlp.c_proj"],
        "parallel": ["c_attn"],
    },
}
# Layers that widen the hidden state into the MLP: a series adapter goes on their input side.
INPUT_SIDE = frozenset(
    {"gate_proj", "up_proj", "gate_up_proj", "dense_h_to_4h", "fc_in", "fc1", "c_fc", "w1", "w3"}
)
ADAPTER_KINDS = ("lora", "series", "adapterp", "parallel")


def default_target_modules(model_type: str, kind: str) -> list[str]:
    """The default target modules of `kind` (lora | series | adapterp | parallel) for a family."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}: expected one of {ADAPTER_KINDS}")
    if model_type not in TARGET_MODULES:
        raise ValueError(
            f"no default target modules for model type {model_type!r}; pass target_modules "
            f"explicitly (families with defaults: {', '.join(sorted(TARGET_MODULES))})"
        )
    return list(TARGET_MODULES[model_type][kind])


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


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


@dataclass
class _Swap:
    name: str
    parent: nn.Module
    attr: str
    old: nn.Module
    new: nn.Module


def _plan_linear_adapters(model: nn.Module, config: AdapterConfig) -> list[_Swap]:
    """Which modules to replace by what, validated; nothing in `model` changes here.
    Fills in `config.target_modules` with the family default when it was None."""
    kind = _config_kind(config)
    targets = config.target_modules or default_target_modules(_model_type(model), kind)
    config.target_modules = targets
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, (LoraLinear, BottleneckAdapter)):
            raise ValueError(
                f"the model already has adapters (at {name!r}); unload them first "
                "(llm_adapters.unload_adapter)"
            )
    chosen = [name for name in modules if name and _matches(name, targets)]
    if isinstance(targets, list):
        missing = [t for t in targets if not any(_matches(n, [t]) for n in chosen)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if is_adaptable(m)})
            raise ValueError(
                f"target module(s) {missing} not found in this {_model_type(model)} model; "
                f"its Linear layers are named: {', '.join(linear)}"
            )
    if not chosen:
        raise ValueError(f"target_modules {targets!r} matches no module of this model")
    plan = []
    for name in chosen:
        module = modules[name]
        if not is_adaptable(module):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}: only nn.Linear and "
                "GPT-2 Conv1D layers can be adapted"
            )
        parent_name, _, attr = name.rpartition(".")
        if isinstance(config, LoraConfig):
            new: nn.Module = LoraLinear(
                module, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora,
                config.init_lora_weights,
            )
        else:
            if kind == "series":
                placement = "input" if attr in INPUT_SIDE else "output"
            else:
                placement = "output" if kind == "adapterp" else "parallel"
            new = BottleneckAdapter(
                module, config.bottleneck_size, placement, config.non_linearity,
                config.adapter_dropout, config.scaling, config.init_weights, config.use_bias,
            )
        plan.append(_Swap(name, modules[parent_name], attr, module, new))
    return plan


def _geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head dim, hidden size) of a decoder's attention."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise ValueError(f"cannot read the attention geometry of a {_model_type(model)} config")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv = config.num_kv_heads
        elif getattr(config, "multi_query", False):
            kv = 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv, head_dim, hidden


def _cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A cache holding only the learned prefix, which it never extends.

        `update` returns prefix ⊕ new keys without storing the new ones, so a layer run twice
        (activation checkpointing replays it in backward) sees the same keys both times, and
        the cache reports the prefix length to the mask builder.
        """

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            pk, pv = self._prefix[layer_idx]
            return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)

    return DynamicCache, PrefixCache


class AdapterModel(nn.Module):
    """A Hugging Face causal LM with adapters: called, generated from and saved like PEFT's.

    LoRA and bottleneck adapters live inside `base_model` (its Linear layers replaced in
    place); prefix and prompt tuning keep their parameters here and feed them in at forward.
    Attributes not found here are looked up on the base model.
    """

    def __init__(self, base_model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.base_model = base_model
        self.adapter_config = config
        self.prefix_encoder: Optional[PrefixEncoder] = None
        self.prompt_embedding: Optional[PromptEmbedding] = None
        self._frozen_state: dict[str, bool] = {}
        params = inspect.signature(base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- soft prompts -------------------------------------------------------------------
    def _prefix_cache(self, batch: int, dtype: torch.dtype, writable: bool):
        dynamic, prefix_cls = _cache_class()
        pairs = self.prefix_encoder(batch, dtype)
        cache = dynamic() if writable else prefix_cls()
        for i, (k, v) in enumerate(pairs):
            dynamic.update(cache, k, v, i)
        if not writable:
            cache._prefix = pairs
        return cache

    def _soft_inputs(
        self, input_ids, attention_mask, inputs_embeds, labels, writable=False, expand=1
    ):
        """Model kwargs with the soft prompt or prefix put in. `expand`: rows per sequence in
        the cache (generate widens the batch for beams after the cache is built)."""
        kwargs: dict[str, Any] = {}
        ref = input_ids if input_ids is not None else inputs_embeds
        batch = ref.shape[0]
        n = (self.prefix_encoder or self.prompt_embedding).embedding.num_embeddings
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if self.prefix_encoder is not None:
            dtype = next(self.base_model.parameters()).dtype
            kwargs[self._cache_kwarg] = self._prefix_cache(batch * expand, dtype, writable)
            kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
            prompt = self.prompt_embedding(batch, inputs_embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompt, inputs_embeds], dim=1)
            if labels is not None:
                pad = labels.new_full((batch, n), -100)
                kwargs["labels"] = torch.cat([pad, labels], dim=1)
        kwargs["attention_mask"] = attention_mask
        return kwargs

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        **kwargs: Any,
    ):
        if self.prefix_encoder is None and self.prompt_embedding is None:
            return self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                labels=labels, **kwargs,
            )
        for key in ("past_key_values", "cache", "position_ids"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be passed to a prefix/prompt-tuned model")
        kwargs.pop("use_cache", None)
        soft = self._soft_inputs(input_ids, attention_mask, inputs_embeds, labels)
        return self.base_model(**soft, use_cache=False, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask=None, **kwargs: Any):
        """Like the base model's generate; the returned sequences start with `input_ids`."""
        if self.prefix_encoder is None and self.prompt_embedding is None:
            return self.base_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = kwargs.get("generation_config") or self.base_model.generation_config
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1)
        expand = max(beams, returned or 1)  # generate repeats each row this often
        soft = self._soft_inputs(input_ids, attention_mask, None, None, True, expand)
        soft.pop("labels", None)
        if self.prompt_embedding is not None:
            out = self.base_model.generate(**soft, **kwargs)
            # generating from embeddings returns only the new tokens: put the prompt back
            prompt_ids = input_ids.repeat_interleave(out.shape[0] // input_ids.shape[0], 0)
            return torch.cat([prompt_ids, out], dim=1)
        return self.base_model.generate(**soft, **kwargs)

    # ---- conveniences PEFT users expect ---------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters_summary(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters_summary()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        # Non-reentrant checkpointing: with a frozen embedding no checkpoint input requires
        # grad, and the reentrant variant would then skip the adapters' backward entirely.
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        # newer transformers renamed it (the old name warns); older ones have only the old name
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **_: Any):
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        save_adapter(self, save_directory)


def _adapter_modules(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, BottleneckAdapter)):
            yield name, module


def _freeze_base(wrapper: AdapterModel, config: AdapterConfig) -> None:
    base = wrapper.base_model
    for p in base.parameters():
        p.requires_grad_(False)
    for _, module in _adapter_modules(base):
        for pname, p in module.named_parameters():
            if not pname.startswith("base_layer."):
                p.requires_grad_(True)
    if isinstance(config, LoraConfig) and config.bias != "none":
        if config.bias == "all":
            biases = [p for n, p in base.named_parameters() if n.endswith("bias")]
        else:
            biases = [
                m.base_layer.bias for _, m in _adapter_modules(base)
                if getattr(m.base_layer, "bias", None) is not None
            ]
        for p in biases:
            p.requires_grad_(True)


def _check_soft_prompt_fits(model: nn.Module, config: AdapterConfig) -> None:
    if isinstance(config, PrefixTuningConfig):
        _geometry(model)
        if _model_type(model) in _PREFIX_UNSUPPORTED:
            raise ValueError(
                f"prefix tuning is not supported for {_model_type(model)}: its attention does "
                "not take key/value prefixes through the cache interface"
            )
    if getattr(model, "get_input_embeddings", None) is None or model.get_input_embeddings() is None:
        raise ValueError("prompt/prefix tuning needs a model with input embeddings")


# Families whose attention does not read a standard key/value cache layout.
_PREFIX_UNSUPPORTED: frozenset[str] = frozenset()


def _build(model: nn.Module, config: AdapterConfig):
    """Everything to attach, without touching `model`: (plan, soft-prompt module)."""
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"expected an adapter config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, AdapterModel):
        raise ValueError("the model already has adapters: pass the base model")
    if isinstance(config, (LoraConfig, BottleneckConfig)):
        return _plan_linear_adapters(model, config), None
    _check_soft_prompt_fits(model, config)
    weight = model.get_input_embeddings().weight
    factory = {"device": weight.device}
    if isinstance(config, PrefixTuningConfig):
        layers, kv, head_dim, hidden = _geometry(model)
        module = PrefixEncoder(
            config.num_virtual_tokens, layers, kv, head_dim, hidden, config.prefix_projection,
            config.encoder_hidden_size,
        ).to(**factory)
        return [], module
    init = None
    if config.init_from_vocab:
        rows = torch.randint(0, weight.shape[0], (config.num_virtual_tokens,))
        init = weight.detach()[rows.to(weight.device)].float()
    module = PromptEmbedding(config.num_virtual_tokens, weight.shape[1], init).to(**factory)
    return [], module


def _attach(model: nn.Module, config: AdapterConfig, plan, soft) -> AdapterModel:
    wrapper = AdapterModel(model, config)
    wrapper._frozen_state = {n: p.requires_grad for n, p in model.named_parameters()}
    for swap in plan:
        setattr(swap.parent, swap.attr, swap.new)
    if isinstance(config, PrefixTuningConfig):
        wrapper.prefix_encoder = soft
        # The prefix cache is read-only, so checkpointed layers may keep it in the replay.
        for module in model.modules():
            if hasattr(type(module), "_can_checkpoint_with_cache"):
                module._can_checkpoint_with_cache = True
    elif isinstance(config, PromptTuningConfig):
        wrapper.prompt_embedding = soft
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
    plan, soft = _build(model, config)
    wrapper = _attach(model, config, plan, soft)
    if verbose:
        wrapper.print_trainable_parameters()
    return wrapper


# ---- save / load ---------------------------------------------------------------------------
def _adapter_state(wrapper: AdapterModel) -> dict[str, Tensor]:
    config = wrapper.adapter_config
    base = wrapper.base_model
    state: dict[str, Tensor] = {}
    if isinstance(config, LoraConfig):
        for name, module in _adapter_modules(base):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight
        if config.bias != "none":
            for name, p in base.named_parameters():
                if name.endswith("bias") and p.requires_grad:
                    state[f"{PEFT_PREFIX}{name}"] = p
    elif isinstance(config, BottleneckConfig):
        for name, module in _adapter_modules(base):
            for pname, p in module.named_parameters():
                if not pname.startswith("base_layer."):
                    state[f"{name}.{pname}"] = p
    else:
        soft = wrapper.prefix_encoder or wrapper.prompt_embedding
        owner = "prefix_encoder" if wrapper.prefix_encoder is not None else "prompt_embedding"
        for pname, p in soft.named_parameters():
            state[f"{owner}.{pname}"] = p
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_adapter(model: AdapterModel, save_directory: str) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format for LoRA)."""
    if not isinstance(model, AdapterModel):
        raise TypeError("save_adapter expects the model returned by get_adapter_model")
    state = _adapter_state(model)
    os.makedirs(save_directory, exist_ok=True)
    model.adapter_config.save(save_directory)
    metadata = {"format": "pt", "model_type": _model_type(model.base_model)}
    save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)


def _read_weights(directory: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, "adapter_model.bin")  # older PEFT / LLM-Adapters releases
    if not os.path.isfile(path):
        if os.path.isfile(legacy):
            state = torch.load(legacy, map_location="cpu", weights_only=True)
            tensors_only = isinstance(state, dict) and all(
                isinstance(v, Tensor) for v in state.values()
            )
            if not tensors_only:
                raise ValueError(f"{legacy} does not hold a tensor state dict")
            return state, {}
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or adapter_model.bin) in {directory!r}")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(path), metadata


def _expected_state(config: AdapterConfig, plan: list[_Swap], soft: Optional[nn.Module]):
    """name -> parameter the file must provide, for a plan that is not yet attached."""
    expected: dict[str, Tensor] = {}
    for swap in plan:
        for pname, p in swap.new.named_parameters():
            if pname.startswith("base_layer."):
                continue
            key = f"{PEFT_PREFIX}{swap.name}.{pname}" if isinstance(config, LoraConfig) else (
                f"{swap.name}.{pname}"
            )
            expected[key] = p
    if soft is not None:
        owner = "prefix_encoder" if isinstance(config, PrefixTuningConfig) else "prompt_embedding"
        for pname, p in soft.named_parameters():
            expected[f"{owner}.{pname}"] = p
    return expected


def load_adapter(model: nn.Module, adapter_path: str, is_trainable: bool = False) -> AdapterModel:
    """Load an adapter saved by `save_adapter` (or PEFT, for LoRA) into a base model.

    Every check runs before the model is touched: the config must fit the model, and the file
    must hold exactly the expected tensors with the expected shapes. Unless `is_trainable`,
    the adapter is frozen and the model put in eval mode, as PEFT does.
    """
    config = load_config(adapter_path)
    tensors, metadata = _read_weights(adapter_path)
    saved_type = metadata.get("model_type")
    if saved_type and saved_type != _model_type(model):
        raise ValueError(
            f"adapter at {adapter_path!r} was trained on a {saved_type} model, not "
            f"{_model_type(model)}"
        )
    plan, soft = _build(model, config)
    expected = _expected_state(config, plan, soft)
    if isinstance(config, LoraConfig) and config.bias != "none":
        for key in tensors:
            if key.endswith("bias") and key.startswith(PEFT_PREFIX):
                expected.setdefault(key, None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter at {adapter_path!r} does not match this model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    bias_values = {}
    for key, p in expected.items():
        t = tensors[key]
        if p is None:
            bias_values[key] = t
            continue
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(t.shape)}, but this model needs "
                f"{tuple(p.shape)} (another rank or architecture?)"
            )
    base_params = dict(model.named_parameters())
    for key, t in bias_values.items():
        name = key[len(PEFT_PREFIX):]
        # bias keys name the wrapped layer's bias as PEFT does (".base_layer.bias")
        target = base_params.get(name)
        if target is None:
            target = base_params.get(name.replace(".base_layer.", "."))
        if target is None or target.shape != t.shape:
            raise ValueError(f"adapter tensor {key!r} does not match a bias of this model")
        bias_values[key] = (target, t)
    with torch.no_grad():
        for key, p in expected.items():
            if p is not None:
                p.copy_(tensors[key])
    wrapper = _attach(model, config, plan, soft)
    with torch.no_grad():
        for target, t in bias_values.values():
            target.copy_(t)
    if not is_trainable:  # inference: nothing trains, dropout off
        for p in wrapper.parameters():
            p.requires_grad_(False)
        wrapper.eval()
    return wrapper


# ---- merge / unload --------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    base = model.base_model if isinstance(model, AdapterModel) else model
    layers = [m for _, m in _adapter_modules(base) if isinstance(m, LoraLinear)]
    others = [n for n, m in _adapter_modules(base) if not isinstance(m, LoraLinear)]
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
    for name, module in list(_adapter_modules(base)):
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


# ---- PEFT interop ----------------------------------------------------------------------------
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
    from .layers._base import autocast_inputs

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


def read_adapter_config(adapter_path: str) -> AdapterConfig:
    """The config of a saved adapter (ours or PEFT's LoRA)."""
    return load_config(adapter_path)
