"""`AdapterModel`: a Hugging Face causal LM with adapters, and the soft-prompt plumbing.

LoRA and bottleneck adapters live inside the base model; prefix and prompt tuning keep their
parameters on the wrapper and feed them in at forward and generate: the prefix through a
read-only key/value cache, the prompt as embeddings prepended to the input.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..layers import PrefixEncoder, PromptEmbedding


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
        # io builds on this class (and on inject, which builds AdapterModels): import it late
        from .io import save_adapter

        save_adapter(self, save_directory)
