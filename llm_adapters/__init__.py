"""llm_adapters: fused adapter kernels for fine-tuning Hugging Face language models."""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
