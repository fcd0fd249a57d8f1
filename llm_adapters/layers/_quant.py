"""Quantized base layers: which formats an adapter can wrap, and their weights as floats.

Supported: bitsandbytes `Linear4bit` (NF4 / FP4, with or without double quantization, any
compute dtype), bitsandbytes `Linear8bitLt`, and an `nn.Linear` whose weight is a torchao
`NF4Tensor`. Their product stays the layer's own (the adapter calls the layer and adds its
branch into the output, `ops.lora_add`); merging dequantizes, adds and re-quantizes.

Formats are recognised by class name and module path, so nothing here imports bitsandbytes or
torchao until a weight has to be dequantized or re-quantized.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

BNB_4BIT, BNB_8BIT, TORCHAO_NF4 = "bnb_4bit", "bnb_8bit", "torchao_nf4"
QLORA_HINT = 'install it with: pip install "llm_adapters[qlora]"'

# packages whose layers hold packed integer weights that no dequantize here understands
_UNSUPPORTED_PACKAGES = ("auto_gptq", "gptqmodel", "awq", "optimum", "hqq", "exllama", "eetq",
                         "aqlm", "quanto", "compressed_tensors", "vptq", "fbgemm_gpu", "marlin")
_PACKED_ATTRS = ("qweight", "qzeros", "g_idx", "wf")


def _classes(obj) -> list[tuple[str, str]]:
    return [(c.__module__ or "", c.__name__) for c in type(obj).__mro__]


def _is(obj, package: str, names: tuple[str, ...]) -> bool:
    return any(m.split(".")[0] == package and n in names for m, n in _classes(obj))


def quant_format(module: nn.Module) -> Optional[str]:
    """The quantized format of a base Linear (`BNB_4BIT`, `BNB_8BIT`, `TORCHAO_NF4`), None for
    a plain float layer; a TypeError naming the layer for a quantized format we cannot wrap
    (GPTQ, AWQ, HQQ, ... and other bitsandbytes / torchao layouts)."""
    name = type(module).__name__
    path = type(module).__module__ or ""
    if _is(module, "bitsandbytes", ("Linear4bit",)):
        return BNB_4BIT
    if _is(module, "bitsandbytes", ("Linear8bitLt",)):
        has_fp16 = getattr(getattr(module, "state", None), "has_fp16_weights", False)
        return None if has_fp16 and module.weight.dtype.is_floating_point else BNB_8BIT
    weight = getattr(module, "weight", None)
    if weight is not None and _is(weight, "torchao", ("NF4Tensor",)):
        return TORCHAO_NF4
    packed = [a for a in _PACKED_ATTRS if isinstance(getattr(module, a, None), Tensor)]
    foreign = path.split(".")[0] in _UNSUPPORTED_PACKAGES + ("bitsandbytes",)
    sub = weight is not None and type(weight) not in (Tensor, nn.Parameter) and any(
        m.split(".")[0] == "torchao" for m, _ in _classes(weight))
    if packed or foreign or sub:
        what = f"{path}.{name}" + (f" (packed {', '.join(packed)})" if packed else "")
        if sub:
            what += f" with a torchao {type(weight).__name__} weight"
        raise TypeError(
            f"{what} is a quantized layer format adapters cannot wrap: supported quantized "
            "bases are bitsandbytes Linear4bit (NF4/FP4) and Linear8bitLt, and nn.Linear with "
            "a torchao NF4Tensor weight"
        )
    return None


def require_bitsandbytes():
    """bitsandbytes, or an ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            f"a bitsandbytes-quantized base needs bitsandbytes ({exc}); {QLORA_HINT}"
        ) from None
    return bitsandbytes


def require_torchao():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:
        try:  # older torchao
            from torchao.dtypes.nf4tensor import to_nf4
        except ImportError as exc:
            raise ImportError(
                f"a torchao NF4 base needs torchao ({exc}); {QLORA_HINT}"
            ) from None
    return to_nf4


def adapter_factory(base_layer: nn.Module) -> dict:
    """Device and dtype of an adapter's weights beside `base_layer`: float32 unless the base
    is float32 / float64 (quantized and half-precision bases get float32 adapters)."""
    weight = base_layer.weight
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    if quant_format(base_layer) is not None:
        dtype = torch.float32
    return {"device": weight.device, "dtype": dtype}


def keep_training_kernel(module: nn.Module) -> bool:
    """Keep a bitsandbytes Linear4bit on its autograd-aware kernel on CPU; True if it changed.

    bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks a Linear4bit's weight in place the first
    time it runs in eval mode under no_grad, for an inference kernel without autograd; from
    then on training-mode forwards take that kernel too, so no gradient flows back through the
    layer, and `dequantize_4bit` of the repacked data is wrong. The repacking is switched off
    here and a weight already repacked is unpacked (as bitsandbytes does before saving).
    Nothing changes on GPU.
    """
    if quant_format(module) != BNB_4BIT:
        return False
    state = getattr(module.weight, "quant_state", None)
    packed = getattr(state, "packing_format_for_cpu", False)
    changed = bool(getattr(module, "support_avx512bf16_for_cpu", False) or packed)
    module.support_avx512bf16_for_cpu = False
    if packed:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        module.weight.data, module.weight.quant_state = (
            _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        )
    return changed


def dequantized_weight(module: nn.Module, fmt: str) -> Tensor:
    """The base weight [N, K] as float32, dequantized."""
    weight = module.weight
    if fmt == BNB_4BIT:
        bnb = require_bitsandbytes()
        keep_training_kernel(module)  # a CPU-repacked weight does not dequantize correctly
        weight = module.weight
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if fmt == BNB_8BIT:
        bnb = require_bitsandbytes()
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        if hasattr(bnb.functional, "int8_vectorwise_dequant"):
            return bnb.functional.int8_vectorwise_dequant(weight.data, scb).float()
        return weight.data.float() * scb.float().view(-1, 1) / 127.0
    if fmt == TORCHAO_NF4:
        return weight.get_original_weight().float()
    raise ValueError(f"unknown quantized format {fmt!r}")


def _quantized_like(module: nn.Module, fmt: str, w: Tensor) -> nn.Parameter:
    """`w` quantized in the format (and with the settings) of `module`'s weight."""
    weight = module.weight
    if fmt == BNB_4BIT:
        bnb = require_bitsandbytes()
        kwargs = {k: v for k, v in vars(weight).items() if not k.startswith("_")}
        kwargs.pop("data", None)
        kwargs.pop("quant_state", None)
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        dtype = weight.quant_state.dtype
        new = bnb.nn.Params4bit(w.to("cpu", dtype), **kwargs)
        return new.to(weight.device)
    if fmt == BNB_8BIT:
        bnb = require_bitsandbytes()
        new = bnb.nn.Int8Params(w.to("cpu", torch.float16), requires_grad=False,
                                has_fp16_weights=False).to(weight.device)
        if getattr(module, "state", None) is not None:
            module.state.reset_grads()
            module.state.SCB = None
            module.state.CB = None
        return new
    if fmt == TORCHAO_NF4:
        to_nf4 = require_torchao()
        new = to_nf4(w.to(weight.dtype), weight.block_size, weight.scaler_block_size)
        return nn.Parameter(new, requires_grad=False)
    raise ValueError(f"unknown quantized format {fmt!r}")


def check_requantizable(module: nn.Module, fmt: str) -> None:
    """Raise before anything changes if `module`'s weight cannot be re-quantized here."""
    if fmt in (BNB_4BIT, BNB_8BIT):
        require_bitsandbytes()
    elif fmt == TORCHAO_NF4:
        require_torchao()


def add_to_quantized(module: nn.Module, fmt: str, delta: Tensor, what: str) -> None:
    """W ← Q(deQ(W) + delta): lossy (the sum is rounded to the format again), so it warns."""
    w = dequantized_weight(module, fmt)
    module.weight = _quantized_like(module, fmt, w + delta.to(w.device, w.dtype))
    warnings.warn(
        f"{what} a LoRA update into a {fmt} base layer re-quantizes its weight: the result is "
        "rounded to the quantized format again (lossy); to keep the exact adapter, save it "
        "and merge into a float copy of the base model instead",
        UserWarning,
        stacklevel=3,
    )


def is_quantized_param(p: Tensor) -> bool:
    """Whether `p` holds quantized data (bitsandbytes Params4bit / Int8Params, torchao NF4)."""
    return _is(p, "bitsandbytes", ("Params4bit", "Int8Params")) or _is(p, "torchao", ("NF4Tensor",))


def param_numel(p: Tensor) -> int:
    """Elements of `p` as PEFT counts them: a 4-bit parameter packs two values per byte of its
    storage, so it counts numel × 2 × the storage's bytes per element."""
    n = p.numel()
    if _is(p, "bitsandbytes", ("Params4bit",)):
        n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
    return n
