"""Running a PEFT LoRA model on our fused op, without converting it.

`accelerate_peft` swaps only each PEFT LoRA Linear's forward, so the model stays a PEFT model
(its parameters, optimizer state, saving and methods untouched); `restore_peft` undoes it.
PEFT's bitsandbytes LoRA layers (QLoRA: `Linear4bit`, `Linear8bitLt`) keep their base
layer's own quantized product and get each active adapter's branch added into it
(`ops.lora_add`; a DoRA one, QDoRA, by `ops.dora_add` with the dequantized weight).
Several active adapters (PEFT's `set_adapter([...])` on the LoraModel) run on a float base:
the first on the fused op, each further one added into its output (`ops.lora_add`).
A further active DoRA adapter rescales the output so far as PEFT's does (`ops.dora_add`).
A layer our op cannot run (lora_bias, another quantized or a non-Linear base, another LoRA
variant) keeps PEFT's forward and is reported by name with the reason.
"""

from __future__ import annotations

import functools
import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..layers._base import Conv1D, autocast_inputs
from ..layers._quant import dequantized_weight, quant_format
from ..layers._sharded import frozen_aware, within_units
from ..layers.lora import cached_weight_norm_sq

logger = logging.getLogger(__name__)
_ORIGINAL = "_llm_adapters_original_forward"
REPORT_ATTR = "llm_adapters_report"


@dataclass
class AccelerationReport:
    """What `accelerate_peft` did: the LoRA layers now on our op, those left on PEFT's path
    (name -> reason), and whether the model had been accelerated already."""

    accelerated: list[str] = field(default_factory=list)
    left_on_peft: dict[str, str] = field(default_factory=dict)
    already_accelerated: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.accelerated) + len(self.left_on_peft) + len(self.already_accelerated)

    def summary(self) -> str:
        running = len(self.accelerated) + len(self.already_accelerated)
        text = f"{running} of {self.total} LoRA layers run on llm_adapters ops"
        if self.already_accelerated and not self.accelerated:
            text += " (already accelerated: nothing new patched)"
        if self.left_on_peft:
            reasons: dict[str, list[str]] = {}
            for name, why in self.left_on_peft.items():
                reasons.setdefault(why, []).append(name)
            parts = [
                f"{why} ({len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                for why, names in reasons.items()
            ]
            text += f"; {len(self.left_on_peft)} left on PEFT: " + "; ".join(parts)
        return text


def _variant_reason(layer: nn.Module, adapter: str) -> Optional[str]:
    """Why `adapter` of this PEFT LoRA layer cannot run on our op, or None."""
    if getattr(layer, "use_dora", {}).get(adapter, False) and not _dora_module(layer, adapter):
        return "DoRA (use_dora) without PEFT's magnitude vector module is not supported"
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "lora_bias (a bias on lora_B) is not supported by our op"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    dora = getattr(layer, "use_dora", {}).get(adapter, False)
    if variant is not None and not (dora and type(variant).__name__ == "DoraLinearVariant"):
        return f"LoRA variant {type(variant).__name__} is not supported by our op"
    return None


def _dora_module(layer: nn.Module, adapter: str) -> Optional[nn.Module]:
    """PEFT's DoRA magnitude module of `adapter` (its `.weight` is the magnitude [N]), or None."""
    mags = getattr(layer, "lora_magnitude_vector", None)
    module = mags[adapter] if mags is not None and adapter in mags else None
    return module if isinstance(getattr(module, "weight", None), Tensor) else None


def _plain_base(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    linear = isinstance(base, nn.Linear) or (bool(Conv1D) and isinstance(base, Conv1D))
    return (
        linear and isinstance(weight, Tensor) and weight.dtype.is_floating_point
        and type(weight) in (nn.Parameter, Tensor)
    )


def _static_reason(
    layer: nn.Module, peft_linear: type, peft_quant: tuple[type, ...] = ()
) -> Optional[str]:
    """Why this PEFT LoRA layer stays on PEFT's path whatever the inputs, or None.
    `peft_quant`: PEFT's LoRA classes over a quantized base that our op runs (`_quant_classes`)."""
    base = layer.get_base_layer()
    kind = f"{type(base).__module__.split('.')[0]} {type(base).__name__}"
    if peft_quant and isinstance(layer, peft_quant):
        return _adapter_reason(layer)
    if not isinstance(layer, peft_linear):
        if isinstance(base, nn.Linear):  # PEFT's LoRA layers for bitsandbytes, torchao, ...
            return f"quantized base layer ({kind}): our op needs a plain float weight"
        return f"LoRA on a {kind} ({type(layer).__name__}): our op covers Linear layers only"
    if not _plain_base(base):
        weight = getattr(base, "weight", None)
        return (
            f"quantized base layer ({kind}, {type(weight).__name__} weight): our op needs a "
            "plain float weight"
        )
    return _adapter_reason(layer)


def _adapter_reason(layer: nn.Module) -> Optional[str]:
    """Why one of the active adapters of this layer keeps it on PEFT's path, or None."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    for adapter in active:
        why = _variant_reason(layer, adapter)
        if why:
            return why
    return None


def _peft_lora_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Replacement forward for a PEFT LoRA Linear: one fused op instead of PEFT's chain (with
    several active adapters, the first on it and each further one added in PEFT's order: a
    LoRA one by `ops.lora_add`, a DoRA one by `dora_add` on the output so far, as PEFT's DoRA
    takes it for the base result). Whatever our op does not cover at this call goes to
    PEFT's forward."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (
        args or kwargs or self.disable_adapters or self.merged or not active
        or _adapter_reason(self) is not None
    ):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    base = self.get_base_layer()
    adapters = _branches(self, active)

    def fused() -> Tensor:
        weight, bias = frozen_aware(base, "weight"), frozen_aware(base, "bias")
        weight = weight.t() if self.fan_in_fan_out else weight
        xc, weight, bias = autocast_inputs(x, weight, bias)
        (lora_a, lora_b, scaling, p, dora), more = adapters[0], adapters[1:]
        if dora is not None:  # PEFT's DoRA math, the row norm detached as PEFT does
            y = ops.dora_linear(
                xc, weight, bias, lora_a.weight, lora_b.weight, dora.weight, scaling=scaling,
                dropout_p=p, weight_norm_sq=cached_weight_norm_sq(dora, base.weight, weight),
            )
        else:
            y = ops.lora_linear(
                xc, weight, bias, lora_a.weight, lora_b.weight, scaling=scaling, dropout_p=p,
            )
        if more and xc.dtype != y.dtype:
            xc, weight = xc.to(y.dtype), weight.to(y.dtype)
        for lora_a, lora_b, scaling, p, dora in more:  # PEFT: each further adapter on result
            if dora is None:
                y = ops.lora_add(y, xc, lora_a.weight, lora_b.weight, scaling=scaling,
                                 dropout_p=p)
            else:
                y = ops.dora_add(
                    y, xc, weight, bias, lora_a.weight, lora_b.weight, dora.weight,
                    scaling=scaling, dropout_p=p,
                    weight_norm_sq=cached_weight_norm_sq(dora, base.weight, weight),
                )
        return y

    # under FSDP1 with PEFT's wrap policy lora_A / lora_B are units of their own (see _sharded)
    units = (base,) + tuple(m for a, b, _, _, d in adapters for m in (a, b, d) if m is not None)
    return within_units(units, fused)


def _branches(layer: nn.Module, active: list[str]) -> list[tuple]:
    """(lora_A, lora_B, scaling, dropout p in this forward, DoRA magnitude module or None) of
    each of `active`, in order."""
    return [
        (layer.lora_A[a], layer.lora_B[a], float(layer.scaling[a]), _dropout_p(layer, a),
         _dora_module(layer, a) if getattr(layer, "use_dora", {}).get(a, False) else None)
        for a in active
    ]


def _dropout_p(layer: nn.Module, adapter: str) -> float:
    """The dropout probability of `adapter`'s branch in this forward (0 in eval mode)."""
    return float(getattr(layer.lora_dropout[adapter], "p", 0.0)) if layer.training else 0.0


def _peft_quant_lora_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Replacement forward for PEFT's bitsandbytes LoRA layers (Linear4bit / Linear8bitLt):
    the quantized base layer computes its own product, our op adds each active adapter's
    branch into it in PEFT's order (`ops.lora_add`: one GEMM into the base output, dropout on
    the branch input only, no [M, N] branch tensor; a DoRA adapter by `ops.dora_add` on the
    output so far with the dequantized weight, as PEFT's QDoRA). Dtypes as PEFT's forward:
    outside CUDA autocast each branch runs in its lora_A's dtype and the sum comes back in
    the base output's; under CUDA autocast the sum is in the promotion of the base output's
    dtype and autocast's (PEFT's `result + output`), our branch in that dtype too. Whatever
    our op does not cover goes to PEFT's forward."""
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (
        args or kwargs or self.disable_adapters or self.merged or not active
        or _adapter_reason(self) is not None
        or not getattr(self, "cast_input_dtype_enabled", True)
    ):
        return getattr(self, _ORIGINAL)(x, *args, **kwargs)
    base = self.get_base_layer()
    adapters = _branches(self, active)
    y = base(x)
    # PEFT asks torch.is_autocast_enabled() without a device: CUDA autocast only
    autocast = torch.is_autocast_enabled() and x.device.type == "cuda"
    out_dtype = (torch.promote_types(y.dtype, torch.get_autocast_dtype("cuda")) if autocast
                 else y.dtype)
    weight = None  # the dequantized base weight, once per forward if a DoRA adapter needs it

    def branch(lora_a, lora_b, scaling, p, dora) -> Tensor:
        nonlocal weight
        dtype = out_dtype if autocast else lora_a.weight.dtype
        y_in, xc = y.to(dtype), x.to(dtype)
        if dora is None:
            return ops.lora_add(y_in, xc, lora_a.weight, lora_b.weight, scaling=scaling,
                                dropout_p=p)
        if weight is None:
            weight = dequantized_weight(base, quant_format(base))
        w = weight.to(dtype)
        return ops.dora_add(
            y_in, xc, w, getattr(base, "bias", None), lora_a.weight, lora_b.weight,
            dora.weight, scaling=scaling, dropout_p=p,
            weight_norm_sq=cached_weight_norm_sq(dora, base.weight, w),
        )

    # under FSDP1 with PEFT's wrap policy lora_A / lora_B are units of their own (see _sharded)
    for spec in adapters:
        units = tuple(m for m in (spec[0], spec[1], spec[4]) if m is not None)
        y = within_units(units, functools.partial(branch, *spec)).to(out_dtype)
    return y


def _quant_classes() -> tuple[type, ...]:
    """PEFT's LoRA layers over bitsandbytes 4-bit / 8-bit bases (those it defines: they exist
    only where bitsandbytes imports)."""
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return ()
    return tuple(c for c in (getattr(peft_bnb, "Linear8bitLt", None),
                             getattr(peft_bnb, "Linear4bit", None)) if c is not None)


def _peft_classes() -> tuple[type, type]:
    try:
        from peft.tuners.lora.layer import Linear, LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is optional
        raise ImportError("accelerate_peft needs peft installed") from exc
    return Linear, LoraLayer


def _lora_layers(model: nn.Module, lora_layer: type) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every PEFT LoRA layer (the outermost, not the LoRA sub-modules)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]


def accelerate_peft(peft_model: nn.Module) -> nn.Module:
    """Switch a PEFT LoRA model's Linear layers onto our fused op, in place.

    The same modules and parameters stay (optimizer state, saving and PEFT's own methods are
    untouched); only each LoRA Linear's forward changes. On PEFT's bitsandbytes 4-bit / 8-bit
    LoRA layers (QLoRA, QDoRA) the quantized base keeps its own product and our ops add each
    active adapter's branch. Several active adapters run on our ops (on a float base the
    first fused, the others added by `ops.lora_add`, or `ops.dora_add` for a DoRA one). A
    layer our op cannot run keeps PEFT's forward and is named in the report with the reason
    (lora_bias, another quantized base, Embedding/Conv LoRA, another LoRA variant); the report
    is logged, warned about when some layers stay on PEFT, and attached as
    `peft_model.llm_adapters_report` (an `AccelerationReport`). Returns the model;
    `restore_peft` undoes it.
    """
    peft_linear, lora_layer = _peft_classes()
    layers = _lora_layers(peft_model, lora_layer)
    if not layers:
        kinds = sorted({type(m).__name__ for m in peft_model.modules() if hasattr(m, "lora_A")})
        raise ValueError(
            "accelerate_peft found no PEFT LoRA Linear layer (no PEFT LoRA layer at all) in "
            f"this {type(peft_model).__name__}"
            + (f"; it has {', '.join(kinds)} modules" if kinds else "")
            + ": pass a model from peft.get_peft_model / PeftModel.from_pretrained with LoRA"
        )
    report = AccelerationReport()
    peft_quant = _quant_classes() if any(not isinstance(m, peft_linear) for _, m in layers) else ()
    for name, module in layers:
        if _ORIGINAL in vars(module):
            report.already_accelerated.append(name)
            continue
        why = _static_reason(module, peft_linear, peft_quant)
        if why is not None:
            report.left_on_peft[name] = why
            continue
        quant = bool(peft_quant) and isinstance(module, peft_quant)
        setattr(module, _ORIGINAL, module.forward)
        forward = _peft_quant_lora_forward if quant else _peft_lora_forward
        module.forward = types.MethodType(forward, module)
        report.accelerated.append(name)
    object.__setattr__(peft_model, REPORT_ATTR, report)
    summary = report.summary()
    logger.info("accelerate_peft: %s", summary)
    if report.left_on_peft or not report.accelerated:
        detail = "".join(f"\n  {n}: {why}" for n, why in report.left_on_peft.items())
        warnings.warn(f"accelerate_peft: {summary}{detail}", stacklevel=2)
    return peft_model


def restore_peft(peft_model: nn.Module) -> nn.Module:
    """Undo `accelerate_peft`."""
    for module in peft_model.modules():
        if _ORIGINAL in vars(module):
            del module.forward
            delattr(module, _ORIGINAL)
    if REPORT_ATTR in vars(peft_model):
        object.__delattr__(peft_model, REPORT_ATTR)
    return peft_model


def acceleration_report(peft_model: nn.Module) -> Optional[AccelerationReport]:
    """The report of the last `accelerate_peft` on this model, or None."""
    return vars(peft_model).get(REPORT_ATTR)

