"""LLM-Adapters' checkpoint format: read what its PEFT fork saved, write what it loads.

The fork (`peft/src/peft` in AGI-Edgerunners/LLM-Adapters) saves `adapter_config.json` (the
config dataclass as JSON, `peft_type` "BOTTLENECK" or "LORA") and `adapter_model.bin`
(`torch.save` of a state dict). Its adapter layers subclass nn.Linear, so a key is
`base_model.model.<module>.<param>` with no `base_layer`: `adapter_down.weight`,
`adapter_up.weight`, `adapter_scaling` (shape [1], only when the scaling is learned);
`lora_A.weight`, `lora_B.weight`; a base bias is `<module>.bias`.

Two things differ from this library and are converted here:
- bottleneck placement: the fork puts a series adapter on the input or output side of a layer
  by its own table (`_SERIES_SIDES`, its TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING), whatever
  `use_adapterp` says; `use_adapterp` only picks the default targets.
- `enable_lora` (set by the fork whenever LoRA has a single target module): the layer is a
  `MergedLinear`: the output is cut into len(enable_lora) equal slices, LoRA feeds only the
  enabled ones, `lora_A` is [r·s, K] (s enabled slices) and `lora_B` a grouped 1×1 Conv1d,
  weight [C, r·s/g, 1] with C = s · slice and g groups (2 in the fork). That is a rank r·s LoRA
  whose B is block-diagonal over the groups and zero on the disabled rows, with the fork's
  scaling alpha / r; it loads as one with r' = r·s and alpha' = alpha·s (alpha'/r' = alpha/r).
"""

from __future__ import annotations

import json
import math
import os
import pickle
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import CONFIG_NAME, AdapterConfig, BottleneckConfig, LoraConfig
from .adapter_model import AdapterModel
from .inject import adapter_modules
from .targets import INPUT_SIDE, model_type

FORMAT_NAME = "llm-adapters"
THEIR_WEIGHTS = "adapter_model.bin"
THEIR_PREFIX = "base_model.model."

# The fork's tuners/bottleneck.py table: model_type -> layer name -> adapter type, where
# "mh_adapter" runs before the layer (our "input" placement), "output_adapter" after it.
_SERIES_SIDES: dict[str, dict[str, str]] = {
    "bloom": {"dense_h_to_4h": "mh_adapter", "dense_4h_to_h": "output_adapter"},
    "gptj": {"fc_in": "mh_adapter", "fc_out": "output_adapter"},
    "gpt_neo": {"c_fc": "mh_adapter", "c_proj": "output_adapter"},
    "llama": {"gate_proj": "mh_adapter", "up_proj": "mh_adapter", "down_proj": "output_adapter"},
    "opt": {"fc1": "mh_adapter", "fc2": "output_adapter"},
    "chatglm": {"dense_h_to_4h": "mh_adapter", "dense_4h_to_h": "output_adapter"},
}
_SIDE_OF_TYPE = {"mh_adapter": "input", "output_adapter": "output"}


# ---- detection and reading -------------------------------------------------------------------
def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # not ours to judge: the regular loader reports it
    return data if isinstance(data, dict) else None


def is_llm_adapters_checkpoint(adapter_path: str) -> bool:
    """True for what only LLM-Adapters' fork writes: a BOTTLENECK adapter, or a LoRA with
    `enable_lora` (MergedLinear). Its plain LoRA files are PEFT's and load as such."""
    data = _read_json(os.path.join(adapter_path, CONFIG_NAME))
    if data is None:
        return False
    kind = data.get("peft_type")
    return kind == "BOTTLENECK" or (kind == "LORA" and data.get("enable_lora") is not None)


def _read_state(path: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no {THEIR_WEIGHTS} at {path!r}: LLM-Adapters saves its weights there"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError) as exc:
        raise ValueError(
            f"{path} cannot be read as a PyTorch state dict (truncated, corrupt, or not saved "
            f"by torch.save of tensors): {type(exc).__name__}: {str(exc)[:200]}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{path} does not hold a state dict (str -> tensor): got {type(state).__name__}"
        )
    if not state:
        raise ValueError(f"{path} holds no tensors")
    return state


def _strip(key: str, path: str) -> str:
    if not key.startswith(THEIR_PREFIX):
        raise ValueError(
            f"{path}: key {key!r} does not start with {THEIR_PREFIX!r}, as LLM-Adapters' keys do"
        )
    return key[len(THEIR_PREFIX):]


def _check_common(data: dict[str, Any], path: str) -> None:
    if data.get("modules_to_save"):
        raise ValueError(
            f"{path}: modules_to_save {data['modules_to_save']!r} (whole trained modules) "
            "cannot be loaded as an adapter"
        )
    task = data.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type {task!r}: only CAUSAL_LM adapters load")


def resolve_targets(model: nn.Module, targets: Any) -> Any:
    """Their target_modules as ours, choosing the same modules in `model`. The fork matches a
    list entry by `name.endswith(entry)` (ours: the whole name or a dotted suffix) and a string
    as a regex on the whole name (as ours); where the two differ, the fork's choice is kept
    as the list of full module names."""
    if not isinstance(targets, list):
        return targets
    theirs = _their_matches(model, targets, set())
    ours = {
        n for n, _ in model.named_modules()
        if n and any(n == t or n.endswith("." + t) for t in targets)
    }
    return targets if not theirs or theirs == ours else sorted(theirs)


def _bottleneck_config(data: dict[str, Any], model: nn.Module, path: str) -> BottleneckConfig:
    if data.get("bias", "none") != "none":
        raise ValueError(
            f"{path}: bias={data['bias']!r} (trained base biases) is not supported for "
            "bottleneck adapters; only bias='none', LLM-Adapters' finetune.py default, loads"
        )
    targets = resolve_targets(model, data.get("target_modules"))
    parallel = bool(data.get("use_parallel_adapter", False))
    adapterp = bool(data.get("use_adapterp", False))
    if not parallel and targets is not None:
        family = model_type(model)
        sides = _SERIES_SIDES.get(family)
        if sides is None:
            raise ValueError(
                f"{path}: LLM-Adapters places series adapters by a table without {family!r} "
                "models; this checkpoint was not trained on this family"
            )
        chosen = sorted(_their_matches(model, targets, set()))
        if not chosen and isinstance(targets, list):
            chosen = targets  # nothing matches: say why by the names
        placement = {}
        for name in chosen:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in sides:
                raise ValueError(
                    f"{path}: LLM-Adapters has no series placement for {leaf!r} on {family}"
                )
            placement[leaf] = _SIDE_OF_TYPE[sides[leaf]]
        # The fork decides the side by its table; ours by use_adapterp (all output) or by
        # INPUT_SIDE. Pick the one that gives the fork's sides, and check it does.
        if adapterp and any(side == "input" for side in placement.values()):
            adapterp = False
        for leaf, side in placement.items():
            ours = "output" if adapterp else ("input" if leaf in INPUT_SIDE else "output")
            if ours != side:
                raise ValueError(
                    f"{path}: cannot place a series adapter on {leaf!r} as LLM-Adapters does"
                )
    scaling = data.get("scaling", 1.0)
    if not isinstance(scaling, str):
        scaling = float(scaling)
    init = data.get("init_weights", "bert")  # bert or mam_adapter, both ours too
    try:
        return BottleneckConfig(
            base_model_name_or_path=data.get("base_model_name_or_path"),
            bottleneck_size=data.get("bottleneck_size", 256),
            non_linearity=data.get("non_linearity", "tanh"),
            adapter_dropout=float(data.get("adapter_dropout") or 0.0),
            use_parallel_adapter=parallel,
            use_adapterp=adapterp,
            target_modules=targets,
            scaling=scaling,
            init_weights=init,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _bottleneck_tensors(state: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """Their keys -> ours: prefix dropped, `adapter_scaling` [1] -> `adapter_scale` []."""
    out = {}
    for key, t in state.items():
        name = _strip(key, path)
        for theirs in (".adapter_scaling", ".adapter_scale"):
            if name.endswith(theirs):
                if t.numel() != 1:
                    raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected [1]")
                name, t = name[: -len(theirs)] + ".adapter_scale", t.reshape(())
        out[name] = t
    return out


def merged_lora_to_dense(
    lora_a: Tensor, lora_b: Tensor, enable_lora: list[bool], r: int
) -> tuple[Tensor, Tensor]:
    """A fork MergedLinear's (lora_A [r·s, K], lora_B conv weight [C, r·s/g, 1]) as a plain
    LoRA pair (A [r·s, K], B [L·C/s, r·s]) with B x = the fork's zero_pad(conv(x)).

    Raises ValueError when the shapes are not those of such a layer."""
    s, n_slices = sum(bool(e) for e in enable_lora), len(enable_lora)
    rank = r * s
    if lora_a.dim() != 2 or lora_a.shape[0] != rank:
        raise ValueError(f"lora_A has shape {tuple(lora_a.shape)}, expected [{rank}, in_features]")
    if lora_b.dim() == 2:
        lora_b = lora_b.unsqueeze(-1)
    if lora_b.dim() != 3 or lora_b.shape[2] != 1 or rank % lora_b.shape[1]:
        raise ValueError(f"lora_B has shape {tuple(lora_b.shape)}, expected [C, {rank}/groups, 1]")
    groups = rank // lora_b.shape[1]
    channels = lora_b.shape[0]
    if channels % s or channels % groups:
        raise ValueError(
            f"lora_B has {channels} output channels: not {s} slices in {groups} groups"
        )
    width, per_out, per_in = channels // s, channels // groups, lora_b.shape[1]
    compact = lora_b.new_zeros(channels, rank)
    for g in range(groups):  # grouped 1x1 conv = block-diagonal matrix
        compact[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in] = (
            lora_b[g * per_out:(g + 1) * per_out, :, 0]
        )
    dense = lora_b.new_zeros(n_slices * width, rank)
    rows = [i for i, on in enumerate(enable_lora) if on]
    for j, i in enumerate(rows):  # zero_pad: enabled slices in order, the rest zero
        dense[i * width:(i + 1) * width] = compact[j * width:(j + 1) * width]
    return lora_a, dense


def _merged_lora(
    data: dict[str, Any], state: dict[str, Tensor], model: nn.Module, path: str
) -> tuple[LoraConfig, dict[str, Tensor]]:
    enable = data["enable_lora"]
    if not isinstance(enable, list) or not enable or not all(isinstance(e, bool) for e in enable):
        raise ValueError(f"{path}: enable_lora must be a list of booleans, got {enable!r}")
    if not any(enable):
        raise ValueError(f"{path}: enable_lora {enable} enables no slice: there is no LoRA to load")
    r, alpha = data.get("r"), data.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(
            f"{path}: r={r!r} and lora_alpha={alpha!r} must be a positive int and a number"
        )
    s = sum(enable)
    out: dict[str, Tensor] = {}
    layers = sorted({k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")})
    for layer in layers:
        a_key, b_key = layer + ".lora_A.weight", layer + ".lora_B.weight"
        if b_key not in state:
            raise ValueError(f"{path}: {a_key!r} has no {b_key!r} beside it")
        _strip(a_key, path)
        try:
            a, b = merged_lora_to_dense(state[a_key], state[b_key], enable, r)
        except ValueError as exc:
            raise ValueError(f"{path}: {layer[len(THEIR_PREFIX):]}: {exc}") from None
        out[a_key], out[b_key] = a, b
    for key, t in state.items():  # base biases (bias != "none") keep PEFT's naming
        if key not in out:
            if not (key.startswith(THEIR_PREFIX) and key.endswith("bias")):
                raise ValueError(
                    f"{path}: unexpected key {key!r} in a MergedLinear LoRA checkpoint"
                )
            out[key] = t
    try:
        config = LoraConfig(
            base_model_name_or_path=data.get("base_model_name_or_path"),
            r=r * s, lora_alpha=alpha * s, lora_dropout=float(data.get("lora_dropout") or 0.0),
            target_modules=resolve_targets(model, data.get("target_modules")),
            bias=data.get("bias", "none"),
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config, out


def read_checkpoint(
    model: nn.Module, adapter_path: str
) -> tuple[AdapterConfig, dict[str, Tensor], dict[str, str]]:
    """(our config, tensors under our file keys, metadata) of an LLM-Adapters checkpoint.

    Nothing of `model` changes; it is read only for its family (series placement)."""
    config_path = os.path.join(adapter_path, CONFIG_NAME)
    data = _read_json(config_path)
    if data is None:
        raise ValueError(f"{config_path} is not a JSON object")
    _check_common(data, config_path)
    weights = os.path.join(adapter_path, THEIR_WEIGHTS)
    state = _read_state(weights)
    if data["peft_type"] == "BOTTLENECK":
        return _bottleneck_config(data, model, config_path), _bottleneck_tensors(state, weights), {}
    config, tensors = _merged_lora(data, state, model, weights)
    return config, tensors, {}


# ---- writing ---------------------------------------------------------------------------------
def _their_matches(model: nn.Module, targets: Any, wrapped: set[str]) -> set[str]:
    """The module names the fork's matching (fullmatch for a regex, else `endswith`) picks in
    the plain model: the wrapped model without its adapter layers' own submodules."""
    import re

    names = [
        n for n, _ in model.named_modules()
        if n and not any(n.startswith(w + ".") for w in wrapped)
    ]
    if isinstance(targets, str):
        return {n for n in names if re.fullmatch(targets, n)}
    return {n for n in names if any(n.endswith(t) for t in targets)}


def _their_targets(model: AdapterModel, config: AdapterConfig) -> Any:
    base = model.base_model
    layers = dict(adapter_modules(base))
    for name, layer in layers.items():
        if type(layer.base_layer) is not nn.Linear:
            raise ValueError(
                f"{name!r} wraps a {type(layer.base_layer).__name__}: LLM-Adapters' layers "
                "replace nn.Linear modules only"
            )
    targets = config.target_modules
    if _their_matches(base, targets, set(layers)) == set(layers):
        return targets
    return sorted(layers)  # full names: the fork's endswith then picks exactly these


def _their_bottleneck_dict(model: AdapterModel, config: BottleneckConfig) -> dict[str, Any]:
    if config.use_bias:
        raise ValueError("LLM-Adapters' bottleneck adapters have no biases (use_bias=True here)")
    from transformers.activations import ACT2FN

    if config.non_linearity not in ACT2FN:
        raise ValueError(
            f"non_linearity {config.non_linearity!r} is not a transformers ACT2FN name"
        )
    if not config.use_parallel_adapter:
        family = model_type(model.base_model)
        sides = _SERIES_SIDES.get(family, {})
        for name, layer in adapter_modules(model.base_model):
            leaf = name.rsplit(".", 1)[-1]
            side = _SIDE_OF_TYPE.get(sides.get(leaf, ""))
            if side is None:
                raise ValueError(
                    f"LLM-Adapters cannot load a series adapter on {name!r}: its placement "
                    f"table has no {leaf!r} for {family} models"
                )
            if side != layer.placement:
                raise ValueError(
                    f"LLM-Adapters would put the series adapter of {name!r} on the {side} "
                    f"side of the layer, not on the {layer.placement} side as here"
                )
    # ours "zero_up" (up = 0) is closest to their "mam_adapter"; loading ignores it anyway
    init = "mam_adapter" if config.init_weights == "zero_up" else config.init_weights
    return {
        "adapter_dropout": config.adapter_dropout,
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": "none",
        "bottleneck_size": config.bottleneck_size,
        "inference_mode": True,
        "init_weights": init,
        "modules_to_save": None,
        "non_linearity": config.non_linearity,
        "peft_type": "BOTTLENECK",
        "scaling": config.scaling if isinstance(config.scaling, str) else float(config.scaling),
        "target_modules": _their_targets(model, config),
        "task_type": "CAUSAL_LM",
        "use_adapterp": config.use_adapterp,
        "use_parallel_adapter": config.use_parallel_adapter,
    }


def _their_lora_dict(model: AdapterModel, config: LoraConfig) -> dict[str, Any]:
    # The fork scales by alpha / r; rsLoRA's alpha / sqrt(r) is the same with alpha·sqrt(r).
    alpha = config.lora_alpha * math.sqrt(config.r) if config.use_rslora else config.lora_alpha
    return {
        "base_model_name_or_path": config.base_model_name_or_path,
        "bias": config.bias,
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": alpha,
        "lora_dropout": config.lora_dropout,
        "merge_weights": False,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": config.r,
        "target_modules": _their_targets(model, config),
        "task_type": "CAUSAL_LM",
    }


def to_their_state(config: AdapterConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our file keys -> theirs (the inverse of what `read_checkpoint` does)."""
    out = {}
    for key, t in state.items():
        if isinstance(config, LoraConfig):
            out[key.replace(".base_layer.", ".")] = t  # PEFT's keys, bias without base_layer
        elif key.endswith(".adapter_scale"):
            out[THEIR_PREFIX + key[: -len("scale")] + "scaling"] = t.reshape(1)
        else:
            out[THEIR_PREFIX + key] = t
    return out


def save_checkpoint(model: AdapterModel, save_directory: str, state: dict[str, Tensor]) -> None:
    """Write `model`'s adapter (file keys and tensors `state`, as this library names them) in
    LLM-Adapters' layout: adapter_config.json as its fork writes it, adapter_model.bin."""
    from .io import WEIGHTS_NAME

    config = model.adapter_config
    if isinstance(config, BottleneckConfig):
        data = _their_bottleneck_dict(model, config)
    elif isinstance(config, LoraConfig):
        data = _their_lora_dict(model, config)
    else:
        raise ValueError(
            f"the {FORMAT_NAME} format holds LoRA and bottleneck adapters, not "
            f"{type(config).__name__}"
        )
    tensors = to_their_state(config, state)
    os.makedirs(save_directory, exist_ok=True)
    stale = os.path.join(save_directory, WEIGHTS_NAME)
    if os.path.isfile(stale):  # would be read before adapter_model.bin by PEFT-style loaders
        os.remove(stale)
    torch.save(tensors, os.path.join(save_directory, THEIR_WEIGHTS))
    with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
