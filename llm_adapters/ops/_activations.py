"""Branch non-linearities φ and their derivatives φ', in float32 on rank-sized tensors.

Only the rank-sized pre-activation S ([M, r]) ever goes through these, so clarity beats
fusion here: each is a handful of elementwise ops on a tensor r/K the size of x.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu")

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}"
        )
    return activation


def apply_activation(s: Tensor, activation: str) -> Tensor:
    """φ(S). Returns S itself for identity (callers must not mutate the result in place)."""
    if activation == "identity":
        return s
    if activation == "tanh":
        return torch.tanh(s)
    if activation == "relu":
        return torch.relu(s)
    if activation == "gelu":  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
        return torch.nn.functional.gelu(s)
    if activation == "silu":
        return torch.nn.functional.silu(s)
    raise ValueError(f"unknown activation {activation!r}")


def activation_grad(s: Tensor, activation: str) -> Tensor | None:
    """φ'(S); None for identity (the caller skips the multiply)."""
    if activation == "identity":
        return None
    if activation == "tanh":
        t = torch.tanh(s)
        return 1.0 - t * t
    if activation == "relu":
        return (s > 0).to(s.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(s * _INV_SQRT2))
        pdf = torch.exp(-0.5 * s * s) * _INV_SQRT2PI
        return cdf + s * pdf
    if activation == "silu":
        sig = torch.sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    raise ValueError(f"unknown activation {activation!r}")
