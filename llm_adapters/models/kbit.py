"""Training adapters on a quantized (k-bit) base model, as PEFT's QLoRA recipe does.

    model = la.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = la.get_adapter_model(model, la.LoraConfig(...))

The quantized layers themselves (bitsandbytes 4-bit / 8-bit, torchao NF4) are recognised in
`layers._quant`; nothing here imports bitsandbytes or torchao until `bnb_quantization_config`
builds a loading config (what `llm-adapters finetune / evaluate --load_4bit / --load_8bit` use).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

from ..layers._quant import (
    is_quantized_param,
    keep_training_kernel,
    quant_format,
    require_bitsandbytes,
)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bnb_quantization_config(
    bits: int,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
):
    """transformers' `BitsAndBytesConfig` for `from_pretrained(quantization_config=...)`:
    `bits` 4 (`quant_type` "nf4" / "fp4", `compute_dtype` of the 4-bit matmul, `double_quant`:
    the quantization constants quantized again, as QLoRA) or 8 (LLM.int8(); the 4-bit options
    are not used). Checks that bitsandbytes is importable (an ImportError naming the `[qlora]`
    extra otherwise). The same config loads on CPU (bitsandbytes 0.50's CPU 4-bit / 8-bit
    kernels) and on GPU."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if compute_dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=bool(double_quant),
    )


def quantized_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, format) of every quantized Linear in `model`."""
    found = []
    for name, module in model.named_modules():
        try:
            fmt = quant_format(module)
        except TypeError:  # a format we cannot wrap: reported when it is targeted
            fmt = "unsupported"
        if fmt is not None:
            found.append((name, fmt))
    return found


def is_kbit_model(model: nn.Module) -> bool:
    """Whether `model` was loaded in 4 / 8 bits or holds quantized Linear layers."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    return bool(quantized_layers(model))


def keep_4bit_training_kernels(model: nn.Module) -> int:
    """Keep every bitsandbytes Linear4bit of `model` on its autograd-aware kernels on CPU.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight, in place, the
    first time it runs in eval mode under no_grad, for an inference kernel (`gemv_4bit`)
    without autograd; from then on training-mode forwards take that kernel too, so no gradient
    flows back through the layer (every adapter below it silently stops learning, e.g. after
    the Trainer's first evaluation) and a layer with a bias fails in place. That repacking is
    switched off here and a weight already repacked is unpacked (as bitsandbytes itself does
    before saving). Nothing changes on GPU. Returns how many layers it changed.
    """
    changed = 0
    for module in model.modules():
        try:
            changed += keep_training_kernel(module)
        except TypeError:  # a quantized layer type we do not adapt: not ours to change
            continue
    return changed


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Ready a quantized base model for adapter training, as PEFT's function of that name:

    - every parameter frozen;
    - every float16 / bfloat16 parameter that is not quantized (norms, embeddings, the LM head)
      cast to float32 for stability; quantized weights are left as they are;
    - with `use_gradient_checkpointing`, gradient checkpointing enabled and, unless
      `use_reentrant=False` is asked for, the input embeddings' output made to require grad
      (reentrant checkpointing needs an input that requires grad to run backward at all);
    - beyond PEFT: bitsandbytes 4-bit layers kept off their CPU inference repacking, which
      cuts their gradient after an evaluation (`keep_4bit_training_kernels`).

    Returns the same model (changed in place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    if use_gradient_checkpointing and not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"{type(model).__name__} has no gradient_checkpointing_enable: pass "
            "use_gradient_checkpointing=False"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    keep_4bit_training_kernels(model)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and not is_quantized_param(p):
            p.data = p.data.to(torch.float32)
    if use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                def make_inputs_require_grad(module, inputs, output):
                    output.requires_grad_(True)

                model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
        params = inspect.signature(model.gradient_checkpointing_enable).parameters
        if "gradient_checkpointing_kwargs" in params:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable()
    return model
