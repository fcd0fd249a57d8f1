"""The `triton` backend: fused Triton kernels from `llm_adapters.triton_kernels`.

Runs CUDA tensors on the GPU, and CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, which must be set before triton is first imported). Each op is present
when its kernel module imports: `triton_kernels.lora` (lora_forward / lora_backward) and
`triton_kernels.series` (series_forward / series_backward), with the contract documented in
`ops/torch_backend.py`. The dropout keep-mask is regenerated from the seed, never stored.
"""

from __future__ import annotations

import importlib
import os

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from ..triton_kernels.dropout import keep_mask as _keep_mask


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
            self.lora_forward = self._lora.lora_forward
            self.lora_backward = self._lora.lora_backward
        if self._series is not None:
            ops.add("series")
            self.series_forward = self._series.series_forward
            self.series_backward = self._series.series_backward
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
