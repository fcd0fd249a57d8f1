"""nn.Modules of the adapter family; each runs on `llm_adapters.ops`."""

from ._base import is_adaptable, linear_dims
from .bottleneck import BottleneckAdapter
from .lora import LoraLinear
from .prompt import PrefixEncoder, PromptEmbedding

__all__ = [
    "BottleneckAdapter",
    "LoraLinear",
    "PrefixEncoder",
    "PromptEmbedding",
    "is_adaptable",
    "linear_dims",
]
