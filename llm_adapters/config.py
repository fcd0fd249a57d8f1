"""Adapter configurations.

Field names follow PEFT for LoRA (so a PEFT `adapter_config.json` reads as ours and ours as
PEFT's) and LLM-Adapters for the bottleneck family and prefix/prompt tuning. Every config is
validated when it is built: a bad value is an error naming the field, before any model is
touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .ops import canonical_activation

CONFIG_NAME = "adapter_config.json"


def _check_targets(value: Any) -> Optional[Union[list[str], str]]:
    """A list of module names (or dotted suffixes), or one string: a regular expression that
    must match the whole module name, as in PEFT."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"target_modules must be a list of module names, got {value!r}")
    if not value:
        raise ValueError("target_modules is empty: name at least one module, or leave it None")
    return list(value)


def _check_dropout(name: str, p: float) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p!r}")


@dataclass
class AdapterConfig:
    """Fields every adapter config has."""

    adapter_type: ClassVar[str] = ""
    base_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "the base model this adapter was trained on"}
    )

    def to_dict(self) -> dict[str, Any]:
        out = {"adapter_type": self.adapter_type}
        out.update(dataclasses.asdict(self))
        return out

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: W x + (alpha / r) · B A D(x), with PEFT's field names."""

    adapter_type: ClassVar[str] = "lora"
    r: int = field(default=8, metadata={"help": "rank of the update, 1..256 or more"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling numerator: s = alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the branch input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "module names (or dotted suffixes), or a regex; None: family default"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r)"})
    bias: str = field(
        default="none", metadata={"help": "'none', 'all' or 'lora_only': which biases train"}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "weights stored [in, out] (GPT-2 Conv1D); auto-set"}
    )
    init_lora_weights: bool = field(default=True, metadata={"help": "B = 0 at init"})

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        _check_dropout("lora_dropout", self.lora_dropout)
        self.target_modules = _check_targets(self.target_modules)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json PEFT writes for the same LoRA adapter."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": (
                self.target_modules if isinstance(self.target_modules, str)
                else sorted(self.target_modules or [])
            ),
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": self.init_lora_weights,
            "inference_mode": True,
            "modules_to_save": None,
        }

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_peft_dict(), f, indent=2, sort_keys=True)


# Bottleneck initialisations: LLM-Adapters' two, then ours (see BottleneckConfig.init_weights).
BOTTLENECK_INITS = ("bert", "mam_adapter", "zero_up")


@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters with LLM-Adapters' field names.

    Series (AdapterH) by default: input side of gate/up-type modules, output side of the
    others. `use_adapterp`: output side of the MLP down projection only (AdapterP).
    `use_parallel_adapter`: a branch beside the Linear, y = W x + s·up(φ(down(D(x)))).
    """

    adapter_type: ClassVar[str] = "bottleneck"
    bottleneck_size: int = field(default=256, metadata={"help": "the adapter's inner width"})
    non_linearity: str = field(
        default="tanh",
        metadata={"help": "any name of transformers' ACT2FN, or identity; identity, tanh, relu, "
                  "gelu, silu (and linear, swish, gelu_python) run on the fused kernels, "
                  "the others on the torch backend"},
    )
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_parallel_adapter: bool = field(default=False, metadata={"help": "parallel placement"})
    use_adapterp: bool = field(default=False, metadata={"help": "AdapterP placement"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "module names, or a regex; None: the family default"}
    )
    scaling: Union[float, str] = field(
        default=1.0, metadata={"help": "a float, or 'learned' for one trainable scalar"}
    )
    init_weights: str = field(
        default="bert",
        metadata={"help": "'bert': N(0, 0.02) both (LLM-Adapters' default); 'mam_adapter': "
                  "down Kaiming-uniform (a = sqrt 5), up = 0 (LLM-Adapters'); 'zero_up': down "
                  "N(0, 0.02), up = 0 (this library's); biases 0 in all three"},
    )
    use_bias: bool = field(default=False, metadata={"help": "biases in the projections"})

    def __post_init__(self) -> None:
        b = self.bottleneck_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(f"bottleneck_size must be a positive integer, got {b!r}")
        try:
            canonical_activation(self.non_linearity)
        except ValueError as exc:
            raise ValueError(f"non_linearity: {exc}") from None
        _check_dropout("adapter_dropout", self.adapter_dropout)
        if self.use_parallel_adapter and self.use_adapterp:
            raise ValueError("use_parallel_adapter and use_adapterp are exclusive: choose one")
        self.target_modules = _check_targets(self.target_modules)
        if isinstance(self.scaling, str):
            if self.scaling != "learned":
                raise ValueError(f"scaling must be a float or 'learned', got {self.scaling!r}")
        elif not isinstance(self.scaling, (int, float)):
            raise ValueError(f"scaling must be a float or 'learned', got {self.scaling!r}")
        if self.init_weights not in BOTTLENECK_INITS:
            raise ValueError(
                f"init_weights must be one of {', '.join(map(repr, BOTTLENECK_INITS))}, "
                f"got {self.init_weights!r}"
            )

    @property
    def placement(self) -> str:
        if self.use_parallel_adapter:
            return "parallel"
        return "adapterp" if self.use_adapterp else "series"


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning: learned per-layer key/value prefixes fed through the model's cache."""

    adapter_type: ClassVar[str] = "prefix_tuning"
    num_virtual_tokens: int = field(default=30, metadata={"help": "prefix length"})
    prefix_projection: bool = field(
        default=False, metadata={"help": "reparameterise the prefix through a 2-layer MLP"}
    )
    encoder_hidden_size: Optional[int] = field(
        default=None, metadata={"help": "hidden width of that MLP (default: model hidden size)"}
    )

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")


@dataclass
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning: learned soft-prompt embeddings prepended to the input embeddings."""

    adapter_type: ClassVar[str] = "prompt_tuning"
    num_virtual_tokens: int = field(default=30, metadata={"help": "soft prompt length"})
    init_from_vocab: bool = field(
        default=True, metadata={"help": "initialise from random rows of the embedding table"}
    )

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {n!r}")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.adapter_type: cls
    for cls in (LoraConfig, BottleneckConfig, PrefixTuningConfig, PromptTuningConfig)
}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Our adapter_config.json, or PEFT's for LoRA (peft_type "LORA")."""
    data = dict(data)
    if data.get("peft_type") is not None:
        if data["peft_type"] != "LORA":
            raise ValueError(
                f"a PEFT adapter of type {data['peft_type']!r} cannot be loaded: only LoRA is "
                "PEFT-compatible; other kinds use this library's own format"
            )
        kind = "lora"
    else:
        kind = data.pop("adapter_type", None)
        if kind not in CONFIG_CLASSES:
            raise ValueError(f"unknown adapter_type {kind!r} in {CONFIG_NAME}")
    cls = CONFIG_CLASSES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def load_config(directory: str) -> AdapterConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not an adapter directory")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(data)
