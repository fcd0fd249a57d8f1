"""llm_adapters: fused adapter kernels for fine-tuning Hugging Face language models.

    import llm_adapters as la
    model = la.get_adapter_model(model, la.LoraConfig(r=16, lora_alpha=32))
    la.save_adapter(model, "out/")
"""

from . import ops
from .config import (
    AdapterConfig,
    BottleneckConfig,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
)
from .layers import BottleneckAdapter, LoraLinear, PrefixEncoder, PromptEmbedding
from .models import (
    TARGET_MODULES,
    AdapterModel,
    accelerate_peft,
    default_target_modules,
    get_adapter_model,
    load_adapter,
    merge_adapter,
    prepare_model_for_kbit_training,
    read_adapter_config,
    restore_peft,
    save_adapter,
    unload_adapter,
    unmerge_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "TARGET_MODULES",
    "AdapterConfig",
    "AdapterModel",
    "BottleneckAdapter",
    "BottleneckConfig",
    "LoraConfig",
    "LoraLinear",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptTuningConfig",
    "__version__",
    "accelerate_peft",
    "default_target_modules",
    "get_adapter_model",
    "load_adapter",
    "merge_adapter",
    "ops",
    "prepare_model_for_kbit_training",
    "read_adapter_config",
    "restore_peft",
    "save_adapter",
    "unload_adapter",
    "unmerge_adapter",
]
