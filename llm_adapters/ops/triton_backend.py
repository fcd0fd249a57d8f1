"""The `triton` backend: fused Triton kernels from `llm_adapters.triton_kernels`.

Runs CUDA tensors on the GPU, and CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, which must be set before triton is first imported). Each op is present
when its kernel module imports: `triton_kernels.lora` (lora_forward / lora_backward) and
`triton_kernels.series` (series_forward / series_backward), with the contract documented in
`ops/torch_backend.py`. The dropout keep-mask is regenerated from the seed, never stored.

float64 (gradcheck and references only) has no tensor-core path in Triton: this adapter runs
it in PyTorch through the torch backend's functions, with the kernels' own Philox keep-mask
regenerated from the seed, so the contract (same mask, nothing stored) is the same.
"""

from __future__ import annotations

import importlib
import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from ..triton_kernels.dropout import keep_mask as _keep_mask
from . import torch_backend

_NO_MASK = torch.empty(0, dtype=torch.bool)


def _philox_mask(shape, p, seed, device):
    return _keep_mask(tuple(shape), p, seed, device) if p > 0.0 else None


def _f64_forward(torch_fwd):
    """A forward that runs float64 in PyTorch with the Philox mask and returns no mask."""

    def forward(x, *args):
        p, seed = args[-3], args[-2]
        out, s_pre, _ = torch_fwd(x, *args, mask=_philox_mask(x.shape, p, seed, x.device))
        return out, s_pre, x.new_empty(0, dtype=torch.bool)

    return forward


def _f64_backward(torch_bwd):
    def backward(g, x, *args):
        # (..., p, seed, activation, s_pre, mask, needs): the mask is regenerated here
        *head, p, seed, activation, s_pre, _mask, needs = args
        mask = _philox_mask(x.shape, p, seed, x.device)
        mask = _NO_MASK if mask is None else mask
        return torch_bwd(g, x, *head, p, seed, activation, s_pre, mask, needs)

    return backward


def _by_dtype(kernel_fn, f64_fn):
    def run(first, *args, **kwargs):
        if first.dtype == torch.float64:
            return f64_fn(first, *args, **kwargs)
        return kernel_fn(first, *args, **kwargs)

    run.__doc__ = kernel_fn.__doc__
    return run


def _try(module: str):
    try:
        return importlib.import_module(f"llm_adapters.triton_kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"llm_adapters.triton_kernels.{module}":
            return None
        raise


class _TritonBackend:
    name = "triton"
    stores_mask = False

    def __init__(self) -> None:
        self._lora = _try("lora")
        self._series = _try("series")
        ops = set()
        if self._lora is not None:
            ops.add("lora")
            self.lora_forward = _by_dtype(
                self._lora.lora_forward, _f64_forward(torch_backend.lora_forward)
            )
            self.lora_backward = _by_dtype(
                self._lora.lora_backward, _f64_backward(torch_backend.lora_backward)
            )
        if self._series is not None:
            ops.add("series")
            self.series_forward = _by_dtype(
                self._series.series_forward, _f64_forward(torch_backend.series_forward)
            )
            self.series_backward = _by_dtype(
                self._series.series_backward, _f64_backward(torch_backend.series_backward)
            )
        self.ops = frozenset(ops)

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


BACKEND = _TritonBackend()
