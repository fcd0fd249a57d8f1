"""The `triton` backend: fused Triton kernels from `llm_adapters.triton_kernels`.

Runs CUDA tensors on the GPU, and CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, which must be set before triton is first imported). The kernels are
`triton_kernels.lora` (lora_forward / lora_backward, lora_add_forward / lora_add_backward),
`triton_kernels.dora` (the same kernels with DoRA's column scale in their epilogues) and
`triton_kernels.series` (series_forward / series_backward), with the contract of
`ops/_backend.py`. The dropout keep-mask is regenerated from the seed, never stored.

float64 (gradcheck and references only) has no tensor-core path in Triton: this adapter runs
it in PyTorch through the torch backend's functions, with the kernels' own Philox keep-mask
regenerated from the seed, so the contract (same mask, nothing stored) is the same.
"""

from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from ..triton_kernels import dora as dora_kernels
from ..triton_kernels import lora as lora_kernels
from ..triton_kernels import series as series_kernels
from ..triton_kernels.dropout import keep_mask as _keep_mask
from . import torch_backend


def _philox_mask(x: Tensor, p: float, seed: int) -> Tensor:
    """The kernels' keep-mask for x (an empty [0] tensor when nothing is dropped)."""
    if p > 0.0:
        return _keep_mask(tuple(x.shape), p, seed, x.device)
    return x.new_empty(0, dtype=torch.bool)


def _no_mask(out: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    y, s_pre, _ = out
    return y, s_pre, y.new_empty(0, dtype=torch.bool)


def lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """The Triton LoRA / parallel-adapter forward (float64: PyTorch with the Philox mask)."""
    if x.dtype == torch.float64:
        return _no_mask(torch_backend.lora_forward(
            x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation,
            mask=_philox_mask(x, p, seed)))
    return lora_kernels.lora_forward(
        x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)


def lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The Triton LoRA / parallel-adapter backward (float64: PyTorch, mask regenerated)."""
    if g.dtype == torch.float64:
        return torch_backend.lora_backward(
            g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre,
            _philox_mask(x, p, seed), needs)
    return lora_kernels.lora_backward(
        g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs)


def lora_add_forward(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """The Triton branch added into y0 (float64: PyTorch with the Philox mask). y0 is read,
    never written: the result is a new tensor, as on the torch backend."""
    if x.dtype == torch.float64:
        return _no_mask(torch_backend.lora_add_forward(
            x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation,
            mask=_philox_mask(x, p, seed)))
    return lora_kernels.lora_add_forward(
        x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)


def lora_add_backward(g, x, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The Triton backward of lora_add: the branch's gradients, dx = D'(dS A) only."""
    if g.dtype == torch.float64:
        return torch_backend.lora_add_backward(
            g, x, a, b, scale_t, scaling, p, seed, activation, s_pre,
            _philox_mask(x, p, seed), needs)
    return lora_kernels.lora_add_backward(
        g, x, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs)


def dora_forward(x, weight, bias, a, b, col_scale, scaling, p, seed, save_t):
    """The Triton DoRA forward: c ⊙ T + bias in the GEMM's epilogue (float64: PyTorch with
    the Philox mask)."""
    if x.dtype == torch.float64:
        y, s_pre, _, t = torch_backend.dora_forward(
            x, weight, bias, a, b, col_scale, scaling, p, seed, save_t,
            mask=_philox_mask(x, p, seed))
        return y, s_pre, y.new_empty(0, dtype=torch.bool), t
    return dora_kernels.dora_forward(x, weight, bias, a, b, col_scale, scaling, p, seed, save_t)


def dora_backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    """The Triton DoRA backward (float64: PyTorch, mask regenerated)."""
    if g.dtype == torch.float64:
        return torch_backend.dora_backward(
            g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, _philox_mask(x, p, seed),
            t, needs)
    return dora_kernels.dora_backward(
        g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs)


def dora_add_forward(x, y0, a, b, bias, col_scale, scaling, p, seed, save_t):
    """The Triton DoRA branch over a base output y0 without its bias (float64: PyTorch with
    the Philox mask). y0 is read, never written."""
    if x.dtype == torch.float64:
        y, s_pre, _, t = torch_backend.dora_add_forward(
            x, y0, a, b, bias, col_scale, scaling, p, seed, save_t,
            mask=_philox_mask(x, p, seed))
        return y, s_pre, y.new_empty(0, dtype=torch.bool), t
    return dora_kernels.dora_add_forward(x, y0, a, b, bias, col_scale, scaling, p, seed, save_t)


def dora_add_backward(g, x, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    """The Triton backward of dora_add: dx = D'(dS A) only, dy0 = c ⊙ g."""
    if g.dtype == torch.float64:
        return torch_backend.dora_add_backward(
            g, x, a, b, col_scale, scaling, p, seed, s_pre, _philox_mask(x, p, seed), t, needs)
    return dora_kernels.dora_add_backward(
        g, x, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs)


def series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation):
    """The Triton series-adapter forward (float64: PyTorch with the Philox mask)."""
    if h.dtype == torch.float64:
        return _no_mask(torch_backend.series_forward(
            h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation,
            mask=_philox_mask(h, p, seed)))
    return series_kernels.series_forward(
        h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation)


def series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The Triton series-adapter backward (float64: PyTorch, mask regenerated)."""
    if g.dtype == torch.float64:
        return torch_backend.series_backward(
            g, h, down, up, scale_t, scaling, p, seed, activation, s_pre,
            _philox_mask(h, p, seed), needs)
    return series_kernels.series_backward(
        g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs)


class _TritonBackend:
    name = "triton"
    ops = frozenset({"lora", "series", "lora_add", "dora", "dora_add"})
    stores_mask = False

    @staticmethod
    def available() -> str | None:
        return None

    @staticmethod
    def supports_device(device: torch.device) -> str | None:
        if device.type == "cuda":
            return None
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            f"Triton kernels need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported (got a {device.type} tensor)"
        )

    @staticmethod
    def keep_mask(shape, p, seed, device):
        return _keep_mask(shape, p, seed, device)

    lora_forward = staticmethod(lora_forward)
    lora_backward = staticmethod(lora_backward)
    lora_add_forward = staticmethod(lora_add_forward)
    lora_add_backward = staticmethod(lora_add_backward)
    dora_forward = staticmethod(dora_forward)
    dora_backward = staticmethod(dora_backward)
    dora_add_forward = staticmethod(dora_add_forward)
    dora_add_backward = staticmethod(dora_add_backward)
    series_forward = staticmethod(series_forward)
    series_backward = staticmethod(series_backward)


BACKEND = _TritonBackend()
