"""What the package knows about each model family, as data.

The default target modules per adapter kind, which MLP layers take a series adapter on their
input side, and the attention geometry prefix tuning reads from a family's config. A new
family is a new row here; the injection routine (`inject.py`) serves every family unchanged.
"""

from __future__ import annotations

from torch import nn

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

# Families whose attention does not read a standard key/value cache layout.
PREFIX_UNSUPPORTED: frozenset[str] = frozenset()


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


def model_type(model: nn.Module) -> str:
    """The family of a model: its config's `model_type`, else its class name."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def attention_geometry(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, key/value heads, head dim, hidden size) of a decoder's attention."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        raise ValueError(f"cannot read the attention geometry of a {model_type(model)} config")
    kv = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "model_type", "") == "falcon":
        if getattr(config, "new_decoder_architecture", False):
            kv = config.num_kv_heads
        elif getattr(config, "multi_query", False):
            kv = 1
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return layers, kv, head_dim, hidden
