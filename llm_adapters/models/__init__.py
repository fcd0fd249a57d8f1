"""Putting adapters into Hugging Face models: target maps, injection, merge, save/load, PEFT.

    targets.py        the family table: default target modules, input-side layers, geometry
    inject.py         planning and attaching adapters (all or nothing), get_adapter_model
    adapter_model.py  AdapterModel, the prefix cache and soft-prompt inputs
    io.py             save/load in PEFT's file format; the one place file keys are named
    merge.py          merge / unmerge LoRA, unload adapters
    kbit.py           prepare_model_for_kbit_training: quantized (QLoRA) bases
    peft_interop.py   accelerate_peft / restore_peft: PEFT LoRA models on our fused op
"""

from .adapter_model import AdapterModel
from .inject import get_adapter_model
from .io import PEFT_PREFIX, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter
from .kbit import prepare_model_for_kbit_training
from .merge import merge_adapter, unload_adapter, unmerge_adapter
from .peft_interop import accelerate_peft, restore_peft
from .targets import ADAPTER_KINDS, INPUT_SIDE, TARGET_MODULES, default_target_modules

__all__ = [
    "ADAPTER_KINDS",
    "INPUT_SIDE",
    "PEFT_PREFIX",
    "TARGET_MODULES",
    "WEIGHTS_NAME",
    "AdapterModel",
    "accelerate_peft",
    "default_target_modules",
    "get_adapter_model",
    "load_adapter",
    "merge_adapter",
    "prepare_model_for_kbit_training",
    "read_adapter_config",
    "restore_peft",
    "save_adapter",
    "unload_adapter",
    "unmerge_adapter",
]
