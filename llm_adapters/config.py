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
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

from .ops import canonical_activation

CONFIG_NAME = "adapter_config.json"


def _check_targets(
    value: Any, name: str = "target_modules", empty: bool = False
) -> Optional[Union[list[str], str]]:
    """A list of module names (or dotted suffixes), or one string: a regular expression that
    must match the whole module name, as in PEFT."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of module names, got {value!r}")
    if not value and not empty:
        raise ValueError(f"{name} is empty: name at least one module, or leave it None")
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


# ---- LoRA: every field of PEFT's LoraConfig, and what this library does with it --------------
HONOURED, METADATA, REFUSED = "honoured", "metadata", "refused"

# Values of init_lora_weights that only choose the initial A and B (the base model untouched).
LORA_INITS = (True, False, "gaussian", "orthogonal")
# Initialisations that change (or quantize) the base weights, or change what trains: an adapter
# trained with one of them does not reproduce on the original base model.
_REFUSED_INITS = {
    "pissa": "PiSSA rewrites the base weights (W - B A); the adapter needs that modified base",
    "olora": "OLoRA rewrites the base weights (QR of W); the adapter needs that modified base",
    "corda": "CorDA rewrites the base weights; the adapter needs that modified base",
    "lora_ga": "LoRA-GA rewrites the base weights; the adapter needs that modified base",
    "loftq": "LoftQ quantizes the base weights; the adapter needs that quantized base",
    "mica": "MiCA freezes lora_B during training (a PEFT LoRA variant)",
}


def _refused(why: str) -> Any:
    return field(default=None, metadata={"refused": why})


def _pattern_key(patterns: dict, name: str) -> Optional[str]:
    """The first key of `patterns` that matches module `name` as PEFT matches rank_pattern /
    alpha_pattern keys: a regex that must match a dotted suffix of the name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _check_pattern(name: str, value: Any, number: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of module name (or regex) -> value, got {value!r}")
    for key, v in value.items():
        try:
            re.compile(key)
        except (re.error, TypeError) as exc:
            raise ValueError(f"{name} key {key!r} is not a valid regex: {exc}") from None
        ok = isinstance(v, number) and not isinstance(v, bool) and v > 0
        if not ok:
            kind = "integer" if number is int else "number"
            raise ValueError(f"{name}[{key!r}] must be a positive {kind}, got {v!r}")
    return dict(value)


def _plain(value: Any) -> Any:
    """An enum member (PEFT's TaskType / PeftType) as its string value."""
    return getattr(value, "value", value)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA: W x + (alpha / r) · B A D(x), with PEFT's field names.

    Every field of PEFT's LoraConfig is accepted by name: honoured (same result as PEFT),
    metadata (kept, no effect on the math) or refused when set, with an error naming it
    (`PEFT_LORA_FIELDS` classifies each one).
    """

    adapter_type: ClassVar[str] = "lora"
    r: int = field(default=8, metadata={"help": "rank of the update, 1..256 or more"})
    lora_alpha: float = field(default=8, metadata={"help": "scaling numerator: s = alpha / r"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the branch input"})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "module names (or dotted suffixes), a regex, or 'all-linear'; "
                  "None: family default"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "s = alpha / sqrt(r)"})
    bias: str = field(
        default="none", metadata={"help": "'none', 'all' or 'lora_only': which biases train"}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "weights stored [in, out] (GPT-2 Conv1D); auto-set"}
    )
    init_lora_weights: Union[bool, str] = field(
        default=True,
        metadata={"help": "True: B = 0, A Kaiming; 'gaussian': A ~ N(0, 1/r), B = 0; "
                  "'orthogonal': B A = 0 from orthogonal halves; False: both random"},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "modules never adapted: names/suffixes, or a regex"}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "modules trained fully and saved (e.g. lm_head, score)"}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "only these layer indices are adapted"}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "name of the layer list (e.g. 'layers', 'h')"}
    )
    rank_pattern: dict = field(
        default_factory=dict, metadata={"help": "module name/regex -> r, overriding r"}
    )
    alpha_pattern: dict = field(
        default_factory=dict, metadata={"help": "module name/regex -> alpha, overriding lora_alpha"}
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: a trainable magnitude per output row, m / ‖W + s·B A‖ scaling "
                  "each row (Linear / Conv1D layers)"},
    )
    # metadata: accepted and kept, no effect on the result
    task_type: Optional[str] = field(default=None, metadata={"help": "CAUSAL_LM (or None)"})
    peft_type: Optional[str] = field(default=None, metadata={"help": "LORA (or None)"})
    inference_mode: bool = False
    revision: Optional[str] = None
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    megatron_core: Optional[str] = "megatron.core"
    qalora_group_size: int = 16
    runtime_config: Any = None
    eva_config: Any = None
    # refused when set (PEFT features this library does not run)
    lora_bias: bool = _refused("a bias on lora_B is not supported")
    target_parameters: Optional[list[str]] = _refused(
        "LoRA on bare nn.Parameters (MoE experts) is not supported; target Linear modules"
    )
    trainable_token_indices: Any = _refused("trainable embedding tokens are not supported")
    layer_replication: Any = _refused("layer replication is not supported")
    megatron_config: Any = _refused("Megatron parallel layers are not supported")
    loftq_config: Any = _refused(_REFUSED_INITS["loftq"])
    corda_config: Any = _refused(_REFUSED_INITS["corda"])
    lora_ga_config: Any = _refused(_REFUSED_INITS["lora_ga"])
    velora_config: Any = _refused("VeLoRA (compressed-activation backward) is not supported")
    alora_invocation_tokens: Any = _refused("activated LoRA (aLoRA) is not supported")
    use_qalora: bool = _refused("QA-LoRA is not supported")
    monteclora_config: Any = _refused("MonteCLoRA is not supported")
    use_bdlora: Any = _refused("block-diagonal LoRA (BD-LoRA) is not supported")
    arrow_config: Any = _refused("Arrow routing is not supported")
    kasa_config: Any = _refused("KaSA (rewrites the base weights) is not supported")
    ensure_weight_tying: bool = _refused("tying adapters of tied layers is not supported")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            why = f.metadata.get("refused")
            value = getattr(self, f.name)
            if why and value:
                raise ValueError(f"{f.name}={value!r} is not supported: {why}")
        task = _plain(self.task_type)
        if task not in (None, "CAUSAL_LM"):
            raise ValueError(
                f"task_type={task!r} is not supported: llm_adapters adapts causal language "
                "models (task_type='CAUSAL_LM')"
            )
        self.task_type = task
        self.peft_type = _plain(self.peft_type)
        if self.peft_type not in (None, "LORA"):
            raise ValueError(f"peft_type={self.peft_type!r}: a LoraConfig has peft_type 'LORA'")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        _check_dropout("lora_dropout", self.lora_dropout)
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {self.use_dora!r}")
        self.target_modules = _check_targets(self.target_modules)
        self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules", empty=True)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        self.rank_pattern = _check_pattern("rank_pattern", self.rank_pattern, int)
        self.alpha_pattern = _check_pattern("alpha_pattern", self.alpha_pattern, (int, float))
        self._check_init()
        self._check_layers()
        if self.modules_to_save is not None:
            m = self.modules_to_save
            if isinstance(m, str) or not all(isinstance(v, str) for v in m):
                raise ValueError(f"modules_to_save must be a list of module names, got {m!r}")
            self.modules_to_save = list(m) or None

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if init in LORA_INITS or init == "eva":
            ranks = [self.r, *self.rank_pattern.values()]
            if init == "orthogonal" and any(r % 2 for r in ranks):
                raise ValueError("init_lora_weights='orthogonal' needs an even rank r")
            return
        if isinstance(init, str):
            name = "pissa" if init.startswith("pissa") else init
            if name in _REFUSED_INITS:
                raise ValueError(
                    f"init_lora_weights={init!r} is not supported: {_REFUSED_INITS[name]}"
                )
        raise ValueError(
            f"init_lora_weights must be one of True, False, 'gaussian', 'orthogonal', 'eva', "
            f"got {init!r}"
        )

    def _check_layers(self) -> None:
        layers = self.layers_to_transform
        if layers is None:
            if self.layers_pattern:
                raise ValueError("layers_pattern needs layers_to_transform to be set too")
            return
        items = [layers] if isinstance(layers, int) else layers
        if not isinstance(items, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
        ):
            raise ValueError(
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
            )
        if isinstance(self.target_modules, str):
            raise ValueError(
                "layers_to_transform cannot be used when target_modules is a regex string"
            )
        self.layers_to_transform = layers if isinstance(layers, int) else list(layers)
        pattern = self.layers_pattern
        if pattern is not None and not (
            isinstance(pattern, str)
            or (isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern))
        ):
            raise ValueError(f"layers_pattern must be a name or a list of names, got {pattern!r}")

    def rank_for(self, name: str) -> int:
        """r of module `name`: rank_pattern's first matching key, else r."""
        key = _pattern_key(self.rank_pattern, name)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, name: str) -> float:
        """lora_alpha of module `name`: alpha_pattern's first matching key, else lora_alpha."""
        key = _pattern_key(self.alpha_pattern, name)
        return self.lora_alpha if key is None else self.alpha_pattern[key]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        """The adapter_config.json PEFT writes for the same LoRA adapter."""

        def names(value):
            return value if value is None or isinstance(value, str) else sorted(value)

        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": names(self.target_modules or []),
            "exclude_modules": names(self.exclude_modules),
            "use_rslora": self.use_rslora,
            "bias": self.bias,
            "fan_in_fan_out": self.fan_in_fan_out,
            "init_lora_weights": self.init_lora_weights,
            "inference_mode": True,
            "modules_to_save": self.modules_to_save,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_dora": self.use_dora,
            "lora_bias": False,
        }

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.to_peft_dict(), f, indent=2, sort_keys=True)


# Each field of PEFT's LoraConfig (peft 0.21): honoured with PEFT's result, kept as metadata,
# or refused when set. A test fails when PEFT grows a field that is not classified here.
PEFT_LORA_FIELDS: dict[str, str] = {
    **dict.fromkeys(
        ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora",
         "bias", "fan_in_fan_out", "init_lora_weights", "modules_to_save", "layers_to_transform",
         "layers_pattern", "rank_pattern", "alpha_pattern", "use_dora"),
        HONOURED,
    ),
    **dict.fromkeys(
        ("task_type", "peft_type", "inference_mode", "revision", "auto_mapping", "peft_version",
         "base_model_name_or_path", "megatron_core", "qalora_group_size", "runtime_config",
         "eva_config"),
        METADATA,
    ),
    **{f.name: REFUSED for f in dataclasses.fields(LoraConfig) if f.metadata.get("refused")},
}


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
    if cls is LoraConfig:
        # A field this library does not know (a newer PEFT's) is dropped only while it holds
        # an off value; set, it could change the result, so it is refused by name.
        unknown = {k: v for k, v in data.items() if k not in names and v not in (None, False)}
        unknown = {k: v for k, v in unknown.items() if v != {} and v != []}
        if unknown:
            raise ValueError(
                f"LoRA config field(s) {sorted(unknown)} are not known to llm_adapters "
                f"(values {[unknown[k] for k in sorted(unknown)]}); refusing to load rather "
                "than ignore them"
            )
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
