"""Saving and loading adapters, in PEFT's file format for LoRA.

A saved adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`
(older PEFT / LLM-Adapters releases wrote `adapter_model.bin`, which loads too). How a
parameter is named in the file is decided in one place, the key-naming section below, which
both saving and loading use. A model with other named adapters (`add_adapter`: LoRA, or
bottleneck adapters beside them) is saved as PEFT saves one: the default adapter at the top,
each other one in a sub-folder named after it, its keys without the adapter's name (a
bottleneck sub-folder holds our config and keys, as a bottleneck adapter saved alone).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import AdapterConfig, LoraConfig, PrefixTuningConfig, load_config
from ._distributed import (
    barrier,
    clean_name,
    full_adapter_state,
    is_writer,
    needs_gather,
    staged_directory,
    unwrap,
)
from .adapter_model import DEFAULT_ADAPTER, AdapterModel
from .inject import (
    adapter_modules,
    attach_adapters,
    own_parameters,
    plan_adapters,
)
from .saved_modules import SAVED_PREFIX
from .targets import model_type

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


# ---- key naming ------------------------------------------------------------------------------
def layer_key(config: AdapterConfig, layer_name: str, param_name: str) -> str:
    """File key of an adapter layer's parameter: PEFT's for LoRA
    (`base_model.model.<layer>.lora_A.weight`); the module path for bottleneck adapters."""
    key = f"{layer_name}.{param_name}"
    return PEFT_PREFIX + key if isinstance(config, LoraConfig) else key


def soft_key(config: AdapterConfig, param_name: str) -> str:
    """File key of a prefix encoder's or prompt embedding's parameter."""
    owner = "prefix_encoder" if isinstance(config, PrefixTuningConfig) else "prompt_embedding"
    return f"{owner}.{param_name}"


def bias_key(param_name: str) -> str:
    """File key of a trained base bias (LoRA with `bias != "none"`), named as PEFT does:
    a wrapped layer's bias is `<layer>.base_layer.bias`."""
    return PEFT_PREFIX + param_name


def is_bias_key(key: str) -> bool:
    return key.startswith(PEFT_PREFIX) and key.endswith("bias")


def _bias_names(key: str) -> tuple[str, str]:
    """The names a bias key may have in a model without adapters: as saved, and without the
    `.base_layer.` that the wrapping adds."""
    name = key[len(PEFT_PREFIX):]
    return name, name.replace(".base_layer.", ".")


def _keyed_parameters(
    config: AdapterConfig, layers: Iterable[tuple[str, nn.Module]], soft: Optional[nn.Module]
) -> dict[str, nn.Parameter]:
    """file key -> parameter, for adapter layers given as (name, layer) and a soft prompt."""
    keyed: dict[str, nn.Parameter] = {}
    for name, layer in layers:
        for pname, p in own_parameters(layer):
            # a module of modules_to_save is saved under its own name (PEFT's layout)
            keyed[layer_key(config, name, pname.removeprefix(SAVED_PREFIX))] = p
    if soft is not None:
        for pname, p in soft.named_parameters():
            keyed[soft_key(config, pname)] = p
    return keyed


# ---- save ------------------------------------------------------------------------------------
def _adapter_parameters(wrapper: AdapterModel) -> dict[str, nn.Parameter]:
    """file key -> parameter, for everything an adapter file holds. Names are taken without
    the segments FSDP1 / checkpoint wrappers insert, so a wrapped model saves the same keys."""
    config = wrapper.adapter_config
    base = wrapper.get_base_model() if hasattr(wrapper, "get_base_model") else wrapper.base_model
    soft = wrapper.prefix_encoder if wrapper.prefix_encoder is not None else (
        wrapper.prompt_embedding
    )
    layers = [(n, m) for n, m in adapter_modules(base) if _holds_default(m)]
    params = dict(_keyed_parameters(config, layers, soft))
    if isinstance(config, LoraConfig) and config.bias != "none":
        for name, p in base.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                params[bias_key(name)] = p
    return {clean_name(k): p for k, p in params.items()}


def _holds_default(layer: nn.Module) -> bool:
    """Whether an adapter layer's own parameters are the default adapter's (a bottleneck layer
    of another named adapter holds that one's)."""
    return getattr(layer, "adapter_name", DEFAULT_ADAPTER) == DEFAULT_ADAPTER


def _adapter_state(wrapper: AdapterModel) -> dict[str, Tensor]:
    """file key -> CPU tensor, in one process (see `save_adapter` for sharded models)."""
    return {k: v.detach().contiguous().cpu() for k, v in _adapter_parameters(wrapper).items()}


def _extra_parameters(wrapper: AdapterModel, adapter_name: str) -> dict[str, nn.Parameter]:
    """file key -> parameter of the named (non-default) adapter, keyed as a default adapter
    of its kind is (PEFT's layout: no adapter name in the key)."""
    from ..layers import BottleneckAdapter, LoraLinear

    keyed = {}
    config = wrapper._extra_configs[adapter_name]
    for name, layer in wrapper.get_base_model().named_modules():
        if isinstance(layer, BottleneckAdapter) and layer.adapter_name == adapter_name:
            keyed.update(_keyed_parameters(config, [(name, layer)], None))
        elif isinstance(layer, LoraLinear):
            branch = layer.branch(adapter_name)
            if branch is not None:
                keyed.update(_branch_keys(config, name, branch))
    return {clean_name(k): p for k, p in keyed.items()}


def _branch_keys(config: AdapterConfig, layer_name: str, branch: nn.Module) -> dict:
    """file key -> parameter of a named adapter's `LoraBranch` in the layer `layer_name`:
    `lora_A.weight`, `lora_B.weight` and, for DoRA, PEFT's file key of the magnitude
    (`<layer>.lora_magnitude_vector`, as the default adapter's)."""
    keyed = {
        layer_key(config, layer_name, "lora_A.weight"): branch.lora_A.weight,
        layer_key(config, layer_name, "lora_B.weight"): branch.lora_B.weight,
    }
    if branch.use_dora:
        keyed[layer_key(config, layer_name, DORA_KEY[1:])] = branch.lora_magnitude_vector
    return keyed


def _extra_states(model: AdapterModel) -> dict[str, dict[str, Tensor]]:
    """adapter name -> (file key -> CPU tensor) of every other named adapter; these are not
    gathered: a sharded one is an error, raised before anything is written."""
    from ._distributed import _is_sharded

    states = {}
    for adapter_name in getattr(model, "_extra_configs", {}):
        params = _extra_parameters(model, adapter_name)
        if any(_is_sharded(p) for p in params.values()):
            raise NotImplementedError(
                f"saving adapter {adapter_name!r} of a sharded (FSDP) model is not supported: "
                "only the default adapter is gathered; delete the others or save unsharded"
            )
        states[adapter_name] = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    return states


def save_adapter(
    model: AdapterModel, save_directory: str, format: Optional[str] = None,
    safe_serialization: bool = True,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT's format for LoRA), or
    with `safe_serialization=False` adapter_model.bin (`torch.save` of the same tensors, as
    PEFT writes it then), or with `format="llm-adapters"` LLM-Adapters' adapter_config.json
    and adapter_model.bin.

    The files are written into a temporary sibling folder and moved into place only when all
    are complete: a save that fails leaves no folder behind, or the previous save intact.
    In a process group only rank 0 writes. Under FSDP (FSDP2 `fully_shard`, or FSDP1
    `FullyShardedDataParallel(use_orig_params=True)`: pass its wrapper) the adapter weights
    are sharded; every rank must then call this, each taking part in gathering them.
    """
    root, model = unwrap(model)
    if not isinstance(model, AdapterModel):
        raise TypeError("save_adapter expects the model returned by get_adapter_model")
    if format not in (None, "llm-adapters"):
        raise ValueError(f"format must be None (this library's) or 'llm-adapters', got {format!r}")
    if format == "llm-adapters" and getattr(model.adapter_config, "use_dora", False):
        raise ValueError(
            "format='llm-adapters' cannot hold a DoRA adapter (use_dora=True): LLM-Adapters' "
            "LoRA has no magnitude vector; save it in PEFT's format (format=None)"
        )
    if format == "llm-adapters" and getattr(model, "_extra_configs", None):
        raise ValueError(
            "format='llm-adapters' holds one adapter; this model has others "
            f"({list(model._extra_configs)}): save it in PEFT's format (format=None)"
        )
    _extra_states(model)  # a sharded other adapter: an error before anything is written
    params = _adapter_parameters(model)
    gathered = needs_gather(params)
    if gathered:  # a collective: {} on every rank but 0
        state = full_adapter_state(root, params)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    try:
        if is_writer():
            write_adapter(model, save_directory, state, format, safe_serialization)
    finally:
        if gathered:  # every rank returns once the files are in place (or the save failed)
            barrier()


def write_adapter(
    model: AdapterModel, save_directory: str, state: dict[str, Tensor],
    format: Optional[str] = None, safe_serialization: bool = True,
) -> None:
    """Write `model`'s adapter config and `state` (file key -> whole CPU tensor), staged and
    moved into place (see `save_adapter`); this process writes, whatever its rank. Other named
    adapters go, each staged the same way, into sub-folders named after them (PEFT's layout)."""
    extras = _extra_states(model)
    if extras and format == "llm-adapters":
        raise ValueError("format='llm-adapters' holds one adapter; this model has others")
    _write_one(model, model.adapter_config, save_directory, state, format, safe_serialization)
    for adapter_name, extra in extras.items():
        _write_one(
            model, model._extra_configs[adapter_name], os.path.join(save_directory, adapter_name),
            extra, None, safe_serialization,
        )


def _write_one(
    model: AdapterModel, config: AdapterConfig, save_directory: str, state: dict[str, Tensor],
    format: Optional[str], safe_serialization: bool,
) -> None:
    # a weights file of the other kind left by an earlier save would be read first, or instead
    stale = (WEIGHTS_NAME,) if format == "llm-adapters" or not safe_serialization else ()
    with staged_directory(save_directory, remove=stale) as staging:
        if format == "llm-adapters":
            from .llm_adapters_format import save_checkpoint

            save_checkpoint(model, staging, state)
            return
        config.save(staging)
        if safe_serialization:
            metadata = {"format": "pt", "model_type": model_type(model.base_model)}
            save_file(state, os.path.join(staging, WEIGHTS_NAME), metadata=metadata)
        else:
            torch.save(state, os.path.join(staging, LEGACY_WEIGHTS_NAME))


# ---- load ------------------------------------------------------------------------------------
def _corrupt(path: str, exc: BaseException) -> ValueError:
    return ValueError(
        f"adapter weights file {path!r} is corrupt or truncated and cannot be read "
        f"({type(exc).__name__}: {exc})"
    )


def _read_weights(directory: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(legacy):
            try:
                state = torch.load(legacy, map_location="cpu", weights_only=True)
            except Exception as exc:  # zip/pickle errors of every kind: a damaged file
                raise _corrupt(legacy, exc) from exc
            tensors_only = isinstance(state, dict) and all(
                isinstance(v, Tensor) for v in state.values()
            )
            if not tensors_only:
                raise ValueError(f"{legacy} does not hold a tensor state dict")
            return _peft_keys(state), {}
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    return _peft_keys(state), metadata


DORA_KEY = ".lora_magnitude_vector"  # PEFT's file key of DoRA's magnitude (as ours)


def _peft_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys as this library names them: a modules_to_save copy written with its in-memory
    name (`<module>.modules_to_save.default.weight`) is read as `<module>.weight`, and DoRA's
    magnitude written with PEFT's in-memory name (`<layer>.lora_magnitude_vector.weight`,
    `.default.weight`) as PEFT's file key `<layer>.lora_magnitude_vector`."""
    out = {}
    for k, v in state.items():
        k = k.replace("." + SAVED_PREFIX, ".")
        for tail in (DORA_KEY + ".default.weight", DORA_KEY + ".weight"):
            if k.endswith(tail):
                k = k[: -len(tail)] + DORA_KEY
        out[k] = v
    return out


def _check_model_type(adapter_path: str, metadata: dict[str, str], model: nn.Module) -> None:
    saved_type = metadata.get("model_type")
    if saved_type and saved_type != model_type(model):
        raise ValueError(
            f"adapter at {adapter_path!r} was trained on a {saved_type} model, not "
            f"{model_type(model)}"
        )


def check_saved_tensors(
    adapter_path: str, expected: dict[str, Optional[Tensor]], tensors: dict[str, Tensor]
) -> None:
    """The saved tensors hold exactly the expected keys, each of the expected parameter's
    shape (None: a key whose shape is checked elsewhere); a ValueError naming the first
    mismatch otherwise."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter at {adapter_path!r} does not match this model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for key, p in expected.items():
        if p is not None and tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, but this model "
                f"needs {tuple(p.shape)} (another rank or architecture?)"
            )


def load_adapter(
    model: nn.Module, adapter_path: str, is_trainable: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
) -> AdapterModel:
    """Load an adapter saved by `save_adapter` (or PEFT, for LoRA) into a base model.

    Every check runs before the model is touched: the config must fit the model, and the file
    must hold exactly the expected tensors with the expected shapes. Unless `is_trainable`,
    the adapter is frozen and the model put in eval mode, as PEFT does.

    With an `adapter_name` other than "default", `model` is an `AdapterModel` (with its default
    LoRA or bottleneck adapter) and the saved LoRA or bottleneck adapter is added to it under
    that name, not made active (PEFT's `load_adapter`); a sub-folder of a multi-adapter save is
    such an adapter.
    """
    if adapter_name != DEFAULT_ADAPTER:
        return _load_extra(model, adapter_path, adapter_name, is_trainable)
    from .adapter_model import refuse_adapted

    refuse_adapted(model)  # a PeftModel, or a model with adapters already: a clear error
    from . import llm_adapters_format as theirs

    if theirs.is_llm_adapters_checkpoint(adapter_path):  # LLM-Adapters' fork wrote it
        config, tensors, metadata = theirs.read_checkpoint(model, adapter_path)
    else:
        config = load_config(adapter_path)
        tensors, metadata = _read_weights(adapter_path)
    _check_model_type(adapter_path, metadata, model)
    plan = plan_adapters(model, config, loading=True)
    layers = ((swap.name, swap.new) for swap in plan.swaps)
    expected: dict[str, Optional[nn.Parameter]] = dict(
        _keyed_parameters(config, layers, plan.soft)
    )
    if isinstance(config, LoraConfig) and config.bias != "none":
        for key in tensors:
            if is_bias_key(key):
                expected.setdefault(key, None)
    check_saved_tensors(adapter_path, expected, tensors)
    bias_values = {key: tensors[key] for key, p in expected.items() if p is None}
    base_params = dict(model.named_parameters())
    for key, t in bias_values.items():
        saved_name, plain_name = _bias_names(key)
        target = base_params.get(saved_name)
        if target is None:
            target = base_params.get(plain_name)
        if target is None or target.shape != t.shape:
            raise ValueError(f"adapter tensor {key!r} does not match a bias of this model")
        bias_values[key] = (target, t)
    with torch.no_grad():
        for key, p in expected.items():
            if p is not None:
                p.copy_(tensors[key])
    wrapper = attach_adapters(model, config, plan)
    with torch.no_grad():
        for target, t in bias_values.values():
            target.copy_(t)
    if not is_trainable:  # inference: nothing trains, dropout off
        for p in wrapper.parameters():
            p.requires_grad_(False)
        wrapper.eval()
    return wrapper


def _load_extra(
    model: nn.Module, adapter_path: str, adapter_name: str, is_trainable: bool
) -> AdapterModel:
    """`load_adapter` under another name: add the saved LoRA or bottleneck adapter to
    `model`."""
    from . import llm_adapters_format as theirs

    if not isinstance(model, AdapterModel):
        raise ValueError(
            f"adapter_name={adapter_name!r}: a model's first adapter is named 'default'; load "
            "it first (la.load_adapter(model, path)), then others under their names"
        )
    model._check_new_name(adapter_name)
    if theirs.is_llm_adapters_checkpoint(adapter_path):
        raise ValueError(
            f"adapter at {adapter_path!r} is an LLM-Adapters checkpoint: only adapters in this "
            "library's (PEFT's) format can be added under another name; load it alone and "
            "save it with la.save_adapter first"
        )
    config = load_config(adapter_path)
    model._new_adapter_checks(adapter_name, config)
    tensors, metadata = _read_weights(adapter_path)
    base = model.get_base_model()
    _check_model_type(adapter_path, metadata, base)
    swaps = model._plan_extra(config, loading=True)
    expected = {}
    for swap in swaps:
        if isinstance(config, LoraConfig):
            expected.update(_branch_keys(config, swap.name, swap.branch))
        else:
            expected.update(_keyed_parameters(config, [(swap.name, swap.new)], None))
    check_saved_tensors(adapter_path, expected, tensors)
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key])
    model._attach_extra(adapter_name, config, swaps)
    if not is_trainable:
        model.eval()
    return model


def read_adapter_config(adapter_path: str) -> AdapterConfig:
    """The config of a saved adapter (ours or PEFT's LoRA)."""
    return load_config(adapter_path)
