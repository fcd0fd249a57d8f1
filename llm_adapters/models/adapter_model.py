"""`AdapterModel`: a Hugging Face causal LM with adapters, and the soft-prompt plumbing.

LoRA and bottleneck adapters live inside the base model; prefix and prompt tuning keep their
parameters on the wrapper and feed them in at forward and generate: the prefix through a
read-only key/value cache, the prompt as embeddings prepended to the input.

Names follow PEFT's `PeftModel` where Hugging Face tools read them: `get_base_model()` is the
Hugging Face causal LM; `base_model` is an `AdapterBaseModel`, whose `.model` is that causal LM
and which forwards attributes to it (PEFT's `LoraModel`) and, called, runs the adapted decoder
without its head (transformers' `base_model`, which TRL's fused LM-head loss calls). The causal
LM is registered as the child `base_model`, so state-dict keys are `base_model.<its keys>`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..layers import BottleneckAdapter, LoraLinear, PrefixEncoder, PromptEmbedding
from ..layers._quant import param_numel
from ..layers.lora import DEFAULT_ADAPTER  # DEFAULT_ADAPTER: PEFT's name


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


def _is_peft_model(model: nn.Module) -> Optional[str]:
    """Where `model` holds PEFT adapters: "" for a PeftModel itself, a module name for a PEFT
    tuner layer inside it, None for none. peft is not imported: without it, there are none."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    except ImportError:  # pragma: no cover - a broken or very old peft
        return None
    if isinstance(model, (PeftModel, BaseTuner)):
        return ""
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            return name
    return None


def _adapter_kind(config: AdapterConfig) -> str:
    placement = getattr(config, "placement", None)
    if isinstance(placement, str):
        return f"{placement} bottleneck"
    return {"lora": "LoRA", "prefix_tuning": "prefix tuning", "prompt_tuning": "prompt tuning"}.get(
        config.adapter_type, config.adapter_type
    )


def refuse_adapted(model: nn.Module) -> None:
    """A clear error when `model` already has adapters (ours or PEFT's): one adapter per model
    is supported, and a PEFT model runs on our ops through `accelerate_peft`. Checks only."""
    where = _is_peft_model(model)
    if where == "":
        raise ValueError(
            f"the model is already a PeftModel ({type(model).__name__}): use "
            "la.accelerate_peft(model) to run its LoRA layers on our ops"
        )
    if where is not None:
        raise ValueError(
            f"the model already has PEFT adapter layers (at {where!r}), so it is already a "
            "PeftModel's base: use la.accelerate_peft(peft_model) on the PeftModel instead"
        )
    if isinstance(model, AdapterModel):
        raise ValueError(
            "the model already has adapters (an adapter of kind "
            f"{_adapter_kind(model.adapter_config)}); several adapters per model: add another "
            "LoRA or bottleneck adapter with model.add_adapter(name, config) or "
            "la.load_adapter(model, path, adapter_name=name), or unload it first with "
            "la.unload_adapter (merge_and_unload for LoRA)"
        )
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, BottleneckAdapter)):
            kind = "LoRA" if isinstance(module, LoraLinear) else "bottleneck"
            raise ValueError(
                f"the model already has adapters (an adapter of kind {kind}, at {name!r}); "
                "several adapters per model are not supported yet: pass the model without them"
            )


class AdapterBaseModel:
    """What `AdapterModel.base_model` is, meaning what both PEFT and transformers mean by it.

    As PEFT's `LoraModel`: `.model` is the Hugging Face causal LM (adapters inside) and other
    attributes are read from it (then from its decoder: `.layers`, `.embed_tokens`). Called,
    it is transformers' `base_model`: the decoder without the LM head, returning hidden states
    for the input tokens, with the soft prompt or prefix fed in (TRL's trainers call this and
    apply the head themselves). A view: it holds nothing but a reference to the wrapper.
    """

    __slots__ = ("_wrapper",)

    def __init__(self, wrapper: AdapterModel) -> None:
        object.__setattr__(self, "_wrapper", wrapper)

    @property
    def model(self) -> nn.Module:
        return self._wrapper.get_base_model()

    def __call__(self, *args: Any, **kwargs: Any):
        return self._wrapper._decoder_forward(*args, **kwargs)

    forward = __call__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        model = self._wrapper.get_base_model()
        try:
            return getattr(model, name)
        except AttributeError:
            decoder = getattr(model, "base_model", model)
            if decoder is model:
                raise
            return getattr(decoder, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._wrapper.get_base_model(), name, value)

    def __repr__(self) -> str:
        return f"AdapterBaseModel(model={type(self.model).__name__})"


class AdapterModel(nn.Module):
    """A Hugging Face causal LM with adapters: called, generated from and saved like PEFT's.

    LoRA and bottleneck adapters live inside the causal LM (`get_base_model()`, its Linear
    layers replaced in place); prefix and prompt tuning keep their parameters here and feed
    them in at forward. Attributes not found here are looked up on the causal LM. The first
    adapter is named "default" as in PEFT; `add_adapter` adds other named LoRA or bottleneck
    adapters (kinds side by side on different layers), `set_adapter` chooses the active ones.
    """

    # transformers' Trainer trains a quantized model only with adapters attached, which it
    # recognises on a PeftModel or by this flag (read here, never on the causal LM inside)
    _hf_peft_config_loaded = True

    def __init__(self, base_model: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self._modules["base_model"] = base_model  # state-dict keys: base_model.<its keys>
        self.adapter_config = config
        self.prefix_encoder: Optional[PrefixEncoder] = None
        self.prompt_embedding: Optional[PromptEmbedding] = None
        self._frozen_state: dict[str, bool] = {}
        self._soft_disabled = False
        self._extra_configs: dict[str, AdapterConfig] = {}  # other named adapters
        self._active_names = [DEFAULT_ADAPTER]  # PEFT's active adapters, in their order
        params = inspect.signature(base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        from .hf_trainer import install_trainer_support

        install_trainer_support()

    def get_base_model(self) -> nn.Module:
        """The Hugging Face causal LM (with the adapter layers inside), as PEFT's."""
        return self._modules["base_model"]

    @property
    def base_model(self) -> AdapterBaseModel:
        """PEFT's and transformers' `base_model` (see `AdapterBaseModel`)."""
        return AdapterBaseModel(self)

    def _fqn_modifiers(self) -> dict[str, str]:
        """For torch.distributed.checkpoint (FSDP2 model and optimizer state, as Trainer's
        checkpoints take it), which finds each parameter by getattr along its state-dict name:
        there `base_model` is looked up on `_children`, where it is the child module, not
        PEFT's view."""
        return {"base_model": "_children"}

    @property
    def _children(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(**self._modules)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "_modules") or name.startswith("__"):
                raise
            return getattr(self.get_base_model(), name)

    @property
    def _soft(self) -> Optional[nn.Module]:
        """The prefix encoder or prompt embedding in use (None: none, or disabled)."""
        if self._soft_disabled:
            return None
        return self.prefix_encoder if self.prefix_encoder is not None else self.prompt_embedding

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
        n = self._soft.embedding.num_embeddings
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if self.prefix_encoder is not None:
            dtype = next(self.get_base_model().parameters()).dtype
            kwargs[self._cache_kwarg] = self._prefix_cache(batch * expand, dtype, writable)
            kwargs.update(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels)
        else:
            if inputs_embeds is None:
                inputs_embeds = self.get_base_model().get_input_embeddings()(input_ids)
            prompt = self.prompt_embedding(batch, inputs_embeds.dtype)
            kwargs["inputs_embeds"] = torch.cat([prompt, inputs_embeds], dim=1)
            if labels is not None:
                pad = labels.new_full((batch, n), -100)
                kwargs["labels"] = torch.cat([pad, labels], dim=1)
        kwargs["attention_mask"] = attention_mask
        return kwargs

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Any, batch: Optional[int], expand: int = 1):
        """Inside: every LoRA and bottleneck layer gives row i of the batch adapter
        `adapter_names[i]` ("__base__": none), PEFT's mixed-adapter batch (inference; a row
        runs one adapter, whatever is active); `expand`: rows per entry (generate repeats each
        row for beams and returned sequences)."""
        if self.training:
            raise ValueError(
                "adapter_names= is for inference: call model.eval() first (PEFT refuses it "
                "in training mode too)"
            )
        if self.prefix_encoder is not None or self.prompt_embedding is not None:
            raise ValueError(
                "adapter_names= is for LoRA and bottleneck adapters; this model's is a soft prompt"
            )
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise TypeError(
                f"adapter_names must be a list of adapter names (one per row), got "
                f"{type(adapter_names).__name__}"
            )
        unknown = sorted({n for n in adapter_names if n != "__base__"} - set(self.peft_config))
        if unknown:
            raise ValueError(
                f"adapter_names: unknown adapter(s) {unknown}; this model's adapters: "
                f"{list(self.peft_config)} (and '__base__' for none)"
            )
        if batch is not None and batch != len(adapter_names):
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows"
            )
        layers = self._lora_layers()
        if any(m.merged for m in layers):
            raise ValueError("adapter_names= needs an unmerged model: unmerge the adapter first")
        layers += self._bottleneck_layers()
        rows = [n for n in adapter_names for _ in range(expand)]
        try:
            for m in layers:
                m.row_adapters = rows
            yield
        finally:
            for m in layers:
                vars(m).pop("row_adapters", None)

    @staticmethod
    def _batch_of(input_ids: Optional[Tensor], inputs_embeds: Optional[Tensor]) -> Optional[int]:
        ref = input_ids if input_ids is not None else inputs_embeds
        return None if ref is None else ref.shape[0]

    @staticmethod
    def _refuse_cache_kwargs(kwargs: dict[str, Any]) -> None:
        for key in ("past_key_values", "cache", "position_ids"):
            if kwargs.get(key) is not None:
                raise ValueError(f"{key} cannot be passed to a prefix/prompt-tuned model")
        kwargs.pop("use_cache", None)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        **kwargs: Any,
    ):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            with self._mixed_batch(adapter_names, self._batch_of(input_ids, inputs_embeds)):
                return self.forward(input_ids, attention_mask, inputs_embeds, labels, **kwargs)
        if self._soft is None:
            return self.get_base_model()(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                labels=labels, **kwargs,
            )
        self._refuse_cache_kwargs(kwargs)
        soft = self._soft_inputs(input_ids, attention_mask, inputs_embeds, labels)
        return self.get_base_model()(**soft, use_cache=False, **kwargs)

    def _decoder_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        """The causal LM's decoder (transformers' `base_model`: no LM head) on these inputs,
        soft prompt or prefix included; hidden states of the virtual tokens are dropped."""
        model = self.get_base_model()
        decoder = getattr(model, "base_model", model)
        if self._soft is None:
            return decoder(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                **kwargs,
            )
        self._refuse_cache_kwargs(kwargs)
        soft = self._soft_inputs(input_ids, attention_mask, inputs_embeds, None)
        soft.pop("labels", None)
        out = decoder(**soft, use_cache=False, **kwargs)
        if self.prompt_embedding is not None and "last_hidden_state" in out:
            n = self.prompt_embedding.embedding.num_embeddings
            out["last_hidden_state"] = out["last_hidden_state"][:, n:]
        return out

    @torch.no_grad()
    def generate(self, input_ids: Optional[Tensor] = None, attention_mask=None, **kwargs: Any):
        """Like the base model's generate; the returned sequences start with `input_ids`
        (with `return_dict_in_generate`, the returned object's `sequences` do)."""
        base = self.get_base_model()
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            config = kwargs.get("generation_config") or base.generation_config
            beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
            returned = kwargs.get("num_return_sequences") or getattr(
                config, "num_return_sequences", 1
            )
            batch = self._batch_of(input_ids, kwargs.get("inputs_embeds"))
            with self._mixed_batch(adapter_names, batch, max(beams, returned or 1)):
                return self.generate(input_ids, attention_mask, **kwargs)
        if self._soft is None:
            return base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = kwargs.get("generation_config") or base.generation_config
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", 1)
        expand = max(beams, returned or 1)  # generate repeats each row this often
        soft = self._soft_inputs(input_ids, attention_mask, None, None, True, expand)
        soft.pop("labels", None)
        out = base.generate(**soft, **kwargs)
        if self.prompt_embedding is None:
            return out
        # generating from embeddings returns only the new tokens: put the prompt back
        new = out if isinstance(out, Tensor) else out.sequences
        prompt_ids = input_ids.repeat_interleave(new.shape[0] // input_ids.shape[0], 0)
        sequences = torch.cat([prompt_ids.to(new.device), new], dim=1)
        if isinstance(out, Tensor):
            return sequences
        out["sequences"] = sequences
        return out

    # ---- PEFT's adapter API: named LoRA adapters, one or several active ------------------
    @property
    def peft_config(self) -> dict[str, AdapterConfig]:
        return {DEFAULT_ADAPTER: self.adapter_config, **self._extra_configs}

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name; with several active, their list (as PEFT's LoraModel)."""
        names = self._active_names
        return names[0] if len(names) == 1 else list(names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_names)

    def _lora_layers(self) -> list[LoraLinear]:
        return [m for m in self.get_base_model().modules() if isinstance(m, LoraLinear)]

    def _bottleneck_layers(self) -> list[BottleneckAdapter]:
        return [m for m in self.get_base_model().modules() if isinstance(m, BottleneckAdapter)]

    def _is_lora(self, adapter_name: str) -> bool:
        from ..config import LoraConfig

        return isinstance(self.peft_config[adapter_name], LoraConfig)

    def _adapters_disabled(self) -> bool:
        layers = [*self._lora_layers(), *self._bottleneck_layers()]
        return bool(layers) and all(m.disable_adapters for m in layers)

    def _check_adapter_names(self, adapter_name: Any) -> list[str]:
        """The adapter names of `set_adapter(adapter_name)` (one name or a list), checked:
        known, no repeats, not empty. Checks only."""
        names = list(adapter_name) if isinstance(adapter_name, (list, tuple)) else [adapter_name]
        if not names:
            raise ValueError(
                "set_adapter([]): give at least one adapter name; to run the base model use "
                "disable_adapter() or disable_adapters()"
            )
        for name in names:
            if not isinstance(name, str) or name not in self.peft_config:
                raise ValueError(
                    f"adapter {name!r} not found; this model's adapters: "
                    f"{list(self.peft_config)}"
                )
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"set_adapter({names}): adapter(s) {repeated} named more than once; name each "
                "active adapter once"
            )
        return names

    def set_adapter(
        self, adapter_name: str | list[str] = DEFAULT_ADAPTER, inference_mode: bool = False
    ) -> None:
        """Make `adapter_name` the active adapter, or a list of names the active adapters, as
        PEFT's LoraModel: each LoRA layer adds the update of every active adapter it holds,
        each bottleneck layer runs if its adapter is active (as its base otherwise), their
        parameters train (unless `inference_mode`) and every other adapter's are frozen;
        a merged model is unmerged first (with a warning) unless the default adapter alone
        stays active. Checked first: on error the model is untouched."""
        names = self._check_adapter_names(adapter_name)
        if not self._extra_configs and not inference_mode:  # the one adapter: nothing to do
            return
        layers = self._lora_layers()
        if names != [DEFAULT_ADAPTER] and any(m.merged for m in layers):
            import warnings

            warnings.warn(
                "the default adapter is merged: unmerging it before switching adapters",
                stacklevel=2,
            )
            for m in layers:
                m.unmerge()
        for m in layers:
            m.active_adapters = list(names)
            for name in m.adapter_names():
                for p in m.branch_parameters(name):
                    p.requires_grad_(name in names and not inference_mode)
        from .inject import own_parameters

        for m in self._bottleneck_layers():
            m.active = m.adapter_name in names
            for _, p in own_parameters(m):
                p.requires_grad_(m.active and not inference_mode)
        self._active_names = names

    def _new_adapter_checks(self, adapter_name: Any, config: Any) -> None:
        self._check_new_name(adapter_name)
        self._check_new_config(config)

    def _check_new_name(self, adapter_name: Any) -> None:
        if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
            raise ValueError(
                f"adapter name {adapter_name!r}: a name must be a Python identifier (it names a "
                "module and a sub-folder of a save)"
            )
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists: delete it first")
        if adapter_name.startswith("__"):
            raise ValueError(f"adapter name {adapter_name!r}: names with '__' are reserved")

    def _check_new_config(self, config: Any) -> None:
        from ..config import BottleneckConfig, LoraConfig

        if not isinstance(config, (LoraConfig, BottleneckConfig)):
            kind = _adapter_kind(config) if isinstance(config, AdapterConfig) else (
                type(config).__name__
            )
            raise ValueError(
                f"add_adapter: a {kind} adapter cannot be added: several adapters per model are "
                "supported for LoRA and bottleneck adapters (an la.LoraConfig or "
                "la.BottleneckConfig); a soft prompt is the model's only adapter"
            )
        default = self.adapter_config
        if not isinstance(default, (LoraConfig, BottleneckConfig)):
            raise ValueError(
                f"add_adapter: this model's default adapter is {_adapter_kind(default)}; "
                "several adapters per model are supported for LoRA and bottleneck adapters, "
                "not beside a soft prompt"
            )
        if isinstance(default, LoraConfig) and (default.bias != "none" or default.modules_to_save):
            raise ValueError(
                "add_adapter: the default adapter trains base biases or modules_to_save, which "
                "other adapters would share; several adapters are not supported for it"
            )
        from ._distributed import _is_sharded

        if any(_is_sharded(p) for p in self.parameters()):
            raise NotImplementedError(
                "add_adapter on an FSDP-sharded model is not supported: add the adapters "
                "before sharding"
            )

    def add_adapter(self, adapter_name: str, peft_config: AdapterConfig, **_: Any) -> None:
        """Add another named adapter (PEFT's `add_adapter`). A LoRA adapter goes on the same
        layers as the default one or others, any rank; a bottleneck adapter (series, AdapterP
        or parallel) on Linear layers no other adapter holds, so kinds sit side by side (LoRA
        on attention, a series adapter on the MLP). It is not made active (call
        `set_adapter`, with a list to run several) and its parameters are frozen until it is.
        Checked first: on error the model is untouched."""
        import dataclasses

        self._new_adapter_checks(adapter_name, peft_config)
        config = dataclasses.replace(peft_config)
        self._attach_extra(adapter_name, config, self._plan_extra(config))

    def _plan_extra(self, config: AdapterConfig, loading: bool = False) -> list:
        from ..config import LoraConfig
        from .inject import plan_extra_bottleneck, plan_extra_lora

        plan = plan_extra_lora if isinstance(config, LoraConfig) else plan_extra_bottleneck
        return plan(self.get_base_model(), config, loading=loading)

    def _attach_extra(self, adapter_name: str, config: AdapterConfig, swaps: list) -> None:
        from ..config import LoraConfig
        from .inject import attach_extra_bottleneck, attach_extra_lora

        disabled = self._adapters_disabled()
        if isinstance(config, LoraConfig):
            attach_extra_lora(swaps, adapter_name, list(self._active_names))
            for swap in swaps:
                swap.layer.disable_adapters = disabled
        else:
            attach_extra_bottleneck(swaps, adapter_name, list(self._active_names), disabled)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = self.adapter_config.base_model_name_or_path
        self._extra_configs[adapter_name] = config

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete a named adapter, as PEFT's: an unknown one is an error; an active one may be
        deleted (the other active adapters stay active, their parameters as they were; if it
        was the only one, the default adapter becomes active, with a warning). The default
        adapter itself cannot be deleted here (la.unload_adapter removes the adapters)."""
        if adapter_name == DEFAULT_ADAPTER:
            raise ValueError(
                "the 'default' adapter cannot be deleted (its weights are the model's "
                "lora_A / lora_B); la.unload_adapter or unload() removes every adapter"
            )
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"adapter {adapter_name!r} does not exist; this model's adapters: "
                f"{list(self.peft_config)}"
            )
        remaining = [n for n in self._active_names if n != adapter_name]
        if remaining and remaining != self._active_names:  # one of several active
            for m in self._lora_layers():
                m.active_adapters = list(remaining)
            self._active_names = remaining
        elif not remaining:
            import warnings

            warnings.warn(
                f"adapter {adapter_name!r} was active and is deleted; the active adapter is now "
                f"{DEFAULT_ADAPTER!r}", stacklevel=2,
            )
            self.set_adapter(DEFAULT_ADAPTER)
        base = self.get_base_model()
        modules = dict(base.named_modules())
        lora = self._is_lora(adapter_name)
        for name, m in list(modules.items()):
            if isinstance(m, LoraLinear) and lora:
                m.delete_branch(adapter_name)
                unwrap = not m.has_default and not m.adapter_names()  # wrapped for it alone
            else:
                unwrap = isinstance(m, BottleneckAdapter) and m.adapter_name == adapter_name
            if unwrap:
                parent_name, _, attr = name.rpartition(".")
                setattr(modules[parent_name], attr, m.base_layer)
        del self._extra_configs[adapter_name]

    def _set_layers_disabled(self, disabled: bool) -> None:
        layers = [
            m for m in self.get_base_model().modules()
            if isinstance(m, (LoraLinear, BottleneckAdapter))
        ]
        if disabled:
            for m in layers:
                if getattr(m, "merged", False):
                    m.unmerge()
        for m in layers:
            m.disable_adapters = disabled
        self._soft_disabled = disabled

    def disable_adapters(self) -> None:
        """Run as the base model until `enable_adapters()` (a merged model is unmerged)."""
        self._set_layers_disabled(True)

    def enable_adapters(self) -> None:
        self._set_layers_disabled(False)

    def disable_adapter_layers(self) -> None:  # PEFT's LoraModel spelling
        self._set_layers_disabled(True)

    def enable_adapter_layers(self) -> None:
        self._set_layers_disabled(False)

    def load_adapter(
        self, model_id: str, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
        **_: Any,
    ) -> None:
        """With the default name: load saved weights of this same adapter into it, in place (a
        Trainer checkpoint, a saved adapter); unless `is_trainable`, freeze it as
        `la.load_adapter` does. With another name: add the saved LoRA adapter under that name
        (`la.load_adapter(model, path, adapter_name=...)`)."""
        if adapter_name != DEFAULT_ADAPTER:
            from .io import load_adapter

            load_adapter(self, model_id, is_trainable=is_trainable, adapter_name=adapter_name)
            return
        from .hf_trainer import load_weights_in_place

        load_weights_in_place(self, model_id)
        if not is_trainable:
            for p in self.parameters():
                p.requires_grad_(False)
            self.eval()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run as the base model inside the block (merged LoRA is unmerged for it), as PEFT's."""
        layers = [
            m for m in self.get_base_model().modules()
            if isinstance(m, (LoraLinear, BottleneckAdapter))
        ]
        saved = [  # modules_to_save copies: the original module runs instead
            m for m in self.get_base_model().modules()
            if isinstance(getattr(m, "modules_to_save", None), nn.ModuleDict)
            and isinstance(getattr(m, "base_layer", None), nn.Module)
        ]
        merged = [m for m in layers if getattr(m, "merged", False)]
        before = [m.disable_adapters for m in layers], self._soft_disabled
        try:
            for m in merged:
                m.unmerge()
            for m in layers:
                m.disable_adapters = True
            for m in saved:
                m.forward = m.base_layer.forward
            self._soft_disabled = True
            yield
        finally:
            for m, flag in zip(layers, before[0]):
                m.disable_adapters = flag
            for m in saved:
                vars(m).pop("forward", None)
            self._soft_disabled = before[1]
            for m in merged:
                m.merge()

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Fold LoRA into the base weights and return the plain Hugging Face model."""
        from .merge import unload_adapter

        return unload_adapter(self, merge=True)

    def unload(self) -> nn.Module:
        """Remove the adapter without merging and return the plain Hugging Face model."""
        from .merge import unload_adapter

        return unload_adapter(self, merge=False)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str, adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False, **_: Any,
    ) -> AdapterModel:
        """PEFT's `PeftModel.from_pretrained(base, path)`: `la.load_adapter`."""
        if adapter_name != DEFAULT_ADAPTER:
            raise NotImplementedError(
                f"adapter_name={adapter_name!r}: a model's first adapter is named "
                f"{DEFAULT_ADAPTER!r}; load others with model.load_adapter(path, adapter_name=...)"
            )
        from .io import load_adapter

        return load_adapter(model, model_id, is_trainable=is_trainable)

    # ---- conveniences PEFT users expect ---------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters_summary(self) -> tuple[int, int]:
        # a 4-bit parameter counts its unpacked elements, as PEFT counts them
        trainable = sum(param_numel(p) for p in self.parameters() if p.requires_grad)
        total = sum(param_numel(p) for p in self.parameters())
        return trainable, total

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return self.trainable_parameters_summary()

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
        base = self.get_base_model()
        # newer transformers renamed it (the old name warns); older ones have only the old name
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **_: Any):
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs)

    def save_pretrained(
        self, save_directory: str, state_dict: Optional[dict[str, Tensor]] = None,
        is_main_process: bool = True, safe_serialization: bool = True, **_: Any,
    ) -> None:
        """Write the adapter only (adapter_config.json + adapter_model.safetensors, or with
        `safe_serialization=False` adapter_model.bin as PEFT writes it), as `la.save_adapter`.
        Takes what `transformers.Trainer` passes: `state_dict` (a whole state dict gathered by
        accelerate, keyed as `self.state_dict()`: the adapter's tensors are taken from it, no
        gathering here) and `is_main_process` (other ranks write nothing)."""
        if not is_main_process:
            return
        # io builds on this class (and on inject, which builds AdapterModels): import it late
        from . import io

        if not state_dict:
            io.save_adapter(self, save_directory, safe_serialization=safe_serialization)
            return
        io.write_adapter(
            self, save_directory, _adapter_state_from(self, state_dict),
            safe_serialization=safe_serialization,
        )


def _adapter_state_from(model: AdapterModel, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """file key -> CPU tensor of the adapter, read from `state_dict` (keyed as
    `model.state_dict()`, FSDP1's wrapper names left out); a tensor it lacks is the
    parameter's own, unless that is sharded."""
    from ._distributed import _is_sharded, clean_name
    from .io import _adapter_parameters

    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    state = {}
    for key, p in _adapter_parameters(model).items():
        value = state_dict.get(names.get(id(p), ""))
        if value is None:
            if _is_sharded(p):
                raise ValueError(
                    f"the state_dict given to save_pretrained lacks the adapter tensor "
                    f"{names.get(id(p), key)!r}, and this rank holds only a shard of it"
                )
            value = p
        state[key] = value.detach().contiguous().cpu()
    return state
