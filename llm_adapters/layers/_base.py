"""What every adapted Linear needs to know about the layer it wraps."""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # GPT-2 style Conv1D: weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features K, out_features N) of an nn.Linear or a Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if bool(Conv1D) and isinstance(module, Conv1D):
        k, n = module.weight.shape
        return k, n
    raise TypeError(
        f"{type(module).__name__} cannot be adapted: only nn.Linear and GPT-2 Conv1D layers can"
    )


def weight_nk(module: nn.Module) -> Tensor:
    """The base weight as [N, K] (a transposed view for Conv1D, no copy)."""
    w = module.weight
    return w.t() if (bool(Conv1D) and isinstance(module, Conv1D)) else w


def autocast_inputs(x: Tensor, *tensors):
    """Cast x and the base weight/bias the way autocast would cast F.linear's inputs.

    Our ops are custom ops, which autocast passes through untouched; without this a
    model trained under autocast would hand them float32 activations with bf16 weights.
    """
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))
