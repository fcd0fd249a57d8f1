"""`transformers.Trainer` (and TRL's trainers, its subclasses) save and resume our models as
adapters: adapter_config.json + adapter_model.safetensors, never the base weights.

Trainer decides how to save a model by its class alone: a `PreTrainedModel` or a `PeftModel`
gets `save_pretrained`; any other module gets its whole state dict written as model.safetensors
(base weights included, no adapter config), and on resume only full weights or a PeftModel's
adapter load. So, once a model of ours exists, five Trainer methods learn about it: `_save`
(write the adapter, then what Trainer writes beside the model), `save_model` (under FSDP, or
whenever the adapter is sharded: the save is a collective, see below),
`_save_optimizer_and_scheduler` (under FSDP: the optimizer's state without the whole model's),
`_load_from_checkpoint` and `_load_best_model` (read the adapter file back into the adapter,
in place, sharded or not). For every other model they are Trainer's own. They have had these
names and signatures across transformers 4.3x-5.x; if they are missing or differ, nothing is
patched and a warning says that Trainer checkpoints of adapter models would hold full weights.

Under FSDP Trainer's `save_model` runs on every rank, gathers the whole model's state dict
(FULL_STATE_DICT) or none at all (SHARDED_STATE_DICT), and calls `_save` on rank 0 only
(transformers 5.17) or on every rank (5.24). Our `save_model` gathers just the adapter's
tensors, on every rank, and rank 0 writes them: the same files whatever the state-dict type or
version. Trainer's FSDP checkpoints would also hold the whole model's FSDP state (base
weights included, gathered onto rank 0 with FULL_STATE_DICT), which only its own resume reads:
for our model it is not written. Resume loads the adapter file into the sharded parameters on
every rank (each keeps its shard); the optimizer, scheduler and RNG states are resumed by
Trainer as for any model.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import os
import sys
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

TRAINER_MODULE = "transformers.trainer"
_MARK = "_llm_adapters_adapter_aware"
_EXPECTED = {
    "_save": ("self", "output_dir", "state_dict"),
    "save_model": ("self", "output_dir", "_internal_call"),
    "_save_optimizer_and_scheduler": ("self", "output_dir"),
    "_load_from_checkpoint": ("self", "resume_from_checkpoint", "model"),
    "_load_best_model": ("self",),
}


# ---- loading saved weights into an existing adapter -------------------------------------------
def load_weights_in_place(
    wrapper: nn.Module, directory: str, root: Optional[nn.Module] = None
) -> None:
    """Copy the tensors of a saved adapter (ours, or a Trainer checkpoint of it) into the
    adapter of `wrapper`. The saved adapter must be of the same kind and hold exactly the
    tensors `wrapper` saves, with the same shapes; otherwise nothing is copied.

    Under FSDP the adapter is sharded: pass the FSDP root as `root` (FSDP1: the outermost
    `FullyShardedDataParallel`; default `wrapper`) and call this on every rank, each reading
    the same folder and keeping its shard of every tensor."""
    from ..config import load_config
    from . import io
    from ._distributed import full_shapes, load_full_adapter_state

    saved_config = load_config(directory)
    ours = wrapper.adapter_config
    if type(saved_config) is not type(ours):
        raise ValueError(
            f"the adapter at {directory!r} is a {type(saved_config).__name__}, this model's is "
            f"a {type(ours).__name__}"
        )
    tensors, _ = io._read_weights(directory)
    params = _keyed_adapter_parameters(wrapper)
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"the adapter at {directory!r} does not match this model's adapter: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}"
        )
    root = wrapper if root is None else root
    for key, shape in full_shapes(root, params).items():
        if shape is not None and tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, this model's "
                f"is {shape}"
            )
    others = _stage_other_adapters(wrapper, directory)  # checked before anything is copied
    load_full_adapter_state(root, params, tensors)
    with torch.no_grad():
        for params, tensors in others:
            for key, p in params.items():
                p.copy_(tensors[key].to(p.device, p.dtype))


def _stage_other_adapters(wrapper: nn.Module, directory: str) -> list[tuple[dict, dict]]:
    """(parameters, saved tensors) of the model's other named adapters, read from their
    sub-folders (`save_adapter`'s layout) and checked against the model's. They are never
    sharded (see io)."""
    import os

    from . import io

    names = list(getattr(wrapper, "_extra_configs", {}))
    staged = []
    for name in names:
        sub = os.path.join(directory, name)
        if not os.path.isdir(sub):
            raise ValueError(f"the checkpoint {directory!r} has no folder for adapter {name!r}")
        tensors, _ = io._read_weights(sub)
        params = io._extra_parameters(wrapper, name)
        io.check_saved_tensors(sub, params, tensors)
        staged.append((params, tensors))
    return staged


def _keyed_adapter_parameters(wrapper: nn.Module) -> dict[str, nn.Parameter]:
    """file key -> parameter of everything `save_adapter` writes for `wrapper` (the keys as
    saved: without the names FSDP1 or checkpoint wrappers insert)."""
    from . import io

    return io._adapter_parameters(wrapper)


# ---- Trainer ------------------------------------------------------------------------------------
def _adapter_model(trainer: Any, model: Optional[nn.Module] = None) -> Optional[nn.Module]:
    """Our AdapterModel behind `model` (default: the trainer's), or None."""
    from .adapter_model import AdapterModel

    model = trainer.model if model is None else model
    unwrap = getattr(getattr(trainer, "accelerator", None), "unwrap_model", None)
    if unwrap is not None:
        try:
            model = unwrap(model)
        except Exception:  # an unwrap this version cannot do: look at the model as it is
            pass
    while not isinstance(model, AdapterModel) and isinstance(getattr(model, "module", None),
                                                             nn.Module):
        model = model.module
    return model if isinstance(model, AdapterModel) else None


def _has_adapter_files(directory: Optional[str]) -> bool:
    from .io import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(directory, name))

    return bool(directory) and has("adapter_config.json") and (
        has(WEIGHTS_NAME) or has(LEGACY_WEIGHTS_NAME)
    )


def _root(trainer: Any, model: Optional[nn.Module] = None) -> nn.Module:
    """The outermost module holding the trainer's model (FSDP1: its root wrapper)."""
    if model is not None:
        return model
    wrapped = getattr(trainer, "model_wrapped", None)
    return wrapped if isinstance(wrapped, nn.Module) else trainer.model


def _collective_save(trainer: Any, ours: nn.Module) -> bool:
    """Whether saving `ours` takes every rank: under accelerate's FSDP, or when its adapter
    is sharded some other way (FSDP2 applied by transformers at load time). DeepSpeed and
    XLA keep Trainer's own save_model, which hands `_save` a gathered state dict."""
    from . import io
    from ._distributed import needs_gather

    if getattr(trainer, "is_deepspeed_enabled", False):
        return False
    if getattr(trainer, "is_fsdp_xla_enabled", False):
        return False
    return bool(getattr(trainer, "is_fsdp_enabled", False)) or needs_gather(
        io._adapter_parameters(ours)
    )


def _fsdp2_checkpoint_problem(trainer: Any, ours: nn.Module) -> Optional[str]:
    """Why Trainer's FSDP2 checkpoint of this model would fail, or None. Beside the model,
    Trainer saves FSDP2 model and optimizer state through torch.distributed.checkpoint, which
    finds each parameter by getattr along its state-dict name (through `_fqn_modifiers`, which
    `AdapterModel` defines so that `base_model` there is the child module, not PEFT's view);
    a model whose names do not walk would fail deep inside."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None),
                     "fsdp_plugin", None)
    if getattr(plugin, "fsdp_version", 1) != 2 or getattr(trainer.args, "save_only_model", False):
        return None
    name = next((n for n, p in ours.named_parameters() if p.requires_grad), None)
    obj: Any = ours
    try:
        for part in (name or "").split(".")[:-1]:
            # as torch.distributed.checkpoint walks: through a module's `_fqn_modifiers`
            hop = getattr(obj, "_fqn_modifiers", dict)().get(part)
            if hop and hasattr(obj, hop):
                obj = getattr(obj, hop)
            obj = getattr(obj, part)
        return None
    except AttributeError:
        return (
            "Trainer's FSDP2 checkpoints (torch.distributed.checkpoint state of the model and "
            "optimizer) cannot walk this adapter model's parameter names; set "
            "save_only_model=True: checkpoints then hold the adapter files, "
            "and resume restores the adapter (the optimizer restarts)"
        )


def _save_beside(trainer: Any, output_dir: str) -> None:
    """What Trainer writes beside a model: the tokenizer / processor and the training
    arguments."""
    processing = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    collator_tokenizer = getattr(getattr(trainer, "data_collator", None), "tokenizer", None)
    if processing is not None:
        processing.save_pretrained(output_dir)
    elif collator_tokenizer is not None:
        collator_tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, "training_args.bin"))


def _save(original, self, output_dir: Optional[str] = None, state_dict=None, *args, **kwargs):
    model = _adapter_model(self)
    if model is None:
        return original(self, output_dir, state_dict, *args, **kwargs)
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if not self.args.should_save:
        return None
    os.makedirs(output_dir, exist_ok=True)
    logger.info("Saving the adapter to %s", output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict)
    _save_beside(self, output_dir)
    return None


def _save_model(original, self, output_dir: Optional[str] = None, _internal_call: bool = False,
                *args, **kwargs):
    ours = _adapter_model(self)
    if ours is None or args or kwargs or not _collective_save(self, ours):
        return original(self, output_dir, _internal_call, *args, **kwargs)
    from .io import save_adapter

    problem = _fsdp2_checkpoint_problem(self, ours) if _internal_call else None
    if problem:  # on every rank alike, before anything is written
        raise ValueError(problem)
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if self.args.should_save:
        os.makedirs(output_dir, exist_ok=True)  # before other ranks' files land in it
        logger.info("Saving the adapter to %s", output_dir)
    save_adapter(_root(self), output_dir)  # every rank gathers; rank 0 writes
    if self.args.should_save:
        _save_beside(self, output_dir)
    if getattr(self.args, "push_to_hub", False) and not _internal_call:
        revision = getattr(self.args, "hub_revision", None)
        extra = {"revision": revision} if revision else {}
        self.push_to_hub(commit_message="Model save", **extra)
    return None


def _save_optimizer_and_scheduler(original, self, output_dir, *args, **kwargs):
    # Under FSDP Trainer saves the whole model's FSDP state here too (base weights included,
    # gathered onto rank 0 with FULL_STATE_DICT) for its own resume; ours reads the adapter
    # files, so for our model that save is skipped and the optimizer's is kept.
    names = original.__globals__
    if (_adapter_model(self) is None or not getattr(self, "is_fsdp_enabled", False)
            or "save_fsdp_model" not in names):
        return original(self, output_dir, *args, **kwargs)
    save_fsdp_model = names["save_fsdp_model"]
    names["save_fsdp_model"] = _skip_model_state
    try:
        return original(self, output_dir, *args, **kwargs)
    finally:
        names["save_fsdp_model"] = save_fsdp_model


def _skip_model_state(*args: Any, **kwargs: Any) -> None:
    return None


def _load_from_checkpoint(original, self, resume_from_checkpoint, model=None, *args, **kwargs):
    ours = _adapter_model(self, model)
    if ours is None or not _has_adapter_files(resume_from_checkpoint):
        return original(self, resume_from_checkpoint, model, *args, **kwargs)
    logger.info("Loading the adapter from %s", resume_from_checkpoint)
    load_weights_in_place(ours, resume_from_checkpoint, _root(self, model))  # every rank
    return None


def _load_best_model(original, self, *args, **kwargs):
    ours = _adapter_model(self)
    best = getattr(self.state, "best_model_checkpoint", None)
    if ours is None or not _has_adapter_files(best):
        return original(self, *args, **kwargs)
    logger.info("Loading the best adapter from %s", best)
    load_weights_in_place(ours, best, _root(self))
    return None


_HOOKS = {"_save": _save, "save_model": _save_model,
          "_save_optimizer_and_scheduler": _save_optimizer_and_scheduler,
          "_load_from_checkpoint": _load_from_checkpoint, "_load_best_model": _load_best_model}


def _method(hook, original):
    @functools.wraps(original)
    def method(self, *args, **kwargs):
        return hook(original, self, *args, **kwargs)

    return method


def _patch(trainer_module: Any) -> bool:
    """Teach `trainer_module.Trainer` about our models; False (and a warning) if its methods
    are not the ones expected."""
    trainer = getattr(trainer_module, "Trainer", None)
    if trainer is None:
        return False
    if getattr(trainer, _MARK, False):
        return True
    for name, expected in _EXPECTED.items():
        method = getattr(trainer, name, None)
        try:
            params = tuple(inspect.signature(method).parameters)[: len(expected)]
        except (TypeError, ValueError):
            params = ()
        if params != expected:
            logger.warning(
                "transformers.Trainer.%s is not the one llm_adapters knows (%s): Trainer will "
                "save adapter models as full state dicts; save them with la.save_adapter",
                name, params,
            )
            return False
    for name, hook in _HOOKS.items():
        setattr(trainer, name, _method(hook, getattr(trainer, name)))
    setattr(trainer, _MARK, True)
    return True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches transformers.trainer right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRAINER_MODULE:
            return None
        _uninstall_finder()  # find the real spec, once
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _patch(module)

        loader.exec_module = exec_module  # this loader serves this one module
        return spec


_FINDER: Optional[_PatchOnImport] = None


def _uninstall_finder() -> None:
    global _FINDER
    if _FINDER is not None and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    _FINDER = None


def install_trainer_support() -> None:
    """Make `transformers.Trainer` save and resume AdapterModels as adapters: now if the
    Trainer is imported, else when it is (importing it costs seconds; models need not)."""
    global _FINDER
    module = sys.modules.get(TRAINER_MODULE)
    if module is not None and getattr(module, "Trainer", None) is not None:
        _patch(module)
        return
    if _FINDER is None and importlib.util.find_spec("transformers") is not None:
        _FINDER = _PatchOnImport()
        sys.meta_path.insert(0, _FINDER)
