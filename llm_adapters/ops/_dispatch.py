"""Backend registry and selection.

A backend is an object with the attributes below; it is imported lazily the first time it is
asked for, so a missing Triton or an unbuilt CUDA extension costs nothing until used.

    name: str
    ops: frozenset[str]                 subset of {"lora", "series"}
    stores_mask: bool                   forward returns an [M, K] bool keep-mask for backward
                                        (False: backward regenerates it from the seed)
    available() -> str | None           None when usable, else the reason it is not
    supports_device(device) -> str | None   None when it runs tensors on `device`, else why not
    keep_mask(shape, p, seed, device) -> Tensor[bool]
    lora_forward(...), lora_backward(...), series_forward(...), series_backward(...)
                                        see ops/torch_backend.py for the exact contract

Selection order: the ``backend=`` keyword, else ``LLM_ADAPTERS_BACKEND``, else ``auto``.
An explicitly requested backend that cannot run is an error, never a silent fallback. ``auto``
takes the only backend that can run; where several can (on a GPU), the one measured fastest
for the op's shape (see `_choice`).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from . import _choice

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {
    "torch": "llm_adapters.ops.torch_backend",
    "triton": "llm_adapters.ops.triton_backend",
    "cuda": "llm_adapters.ops.cuda_backend",
}
_loaded: dict[str, Any] = {}
_load_errors: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, not built, wrong device)."""


def _load(name: str) -> Any | None:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
        backend = module.BACKEND
    except ModuleNotFoundError as exc:  # the backend's module, or its dependency, is missing
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    except ImportError as exc:
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    reason = backend.available()
    if reason is not None:
        _load_errors[name] = reason
        return None
    from ._custom import lora_op, series_op  # here, not at import: _custom is light but lazy

    makers = {"lora": lora_op, "series": series_op}
    backend.custom_ops = {op: makers[op](backend) for op in backend.ops}
    _loaded[name] = backend
    return backend


def loaded_backend(name: str) -> Any:
    """The backend object `name`, already loaded by `resolve_backend`."""
    return _loaded[name]


def backend_status(name: str) -> str | None:
    """None when backend `name` is usable in this process, else the reason it is not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return None if _load(name) is not None else _load_errors.get(name, "not available")


def available_backends() -> list[str]:
    """Names of the backends that load in this process (not all run on every device)."""
    return [name for name in BACKENDS if _load(name) is not None]


def _requested(backend: str | None) -> str:
    requested = backend or os.environ.get("LLM_ADAPTERS_BACKEND", "") or "auto"
    requested = requested.strip().lower()
    if requested != "auto" and requested not in BACKENDS:
        source = "backend=" if backend else "LLM_ADAPTERS_BACKEND="
        raise ValueError(
            f"unknown backend {source}{requested!r}: expected auto, {', '.join(BACKENDS)}"
        )
    return requested


def _auto_order(op: str, device: torch.device) -> list[str]:
    if device.type == "cuda":
        # the order only breaks ties where nothing was measured: see _choice
        return list(_choice.DEFAULT_ORDER)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ["triton", "torch"]
    return ["torch"]


def _ready_for_auto(name: str) -> bool:
    """Whether `auto` may pick backend `name` without first compiling it: the CUDA extension
    takes part once it is loaded, built ahead of time or in the JIT cache (a fresh JIT build
    takes minutes, and auto never starts one)."""
    if name != "cuda":
        return True
    return bool(importlib.import_module(_MODULES[name]).ready_without_compile())


def auto_candidates(op: str | None, device: torch.device) -> list[str]:
    """The backends `auto` chooses among for `op` on `device`, in tie-break order."""
    names = []
    for name in _auto_order(op, device):
        impl = _load(name)
        if impl is None or (op is not None and op not in impl.ops):
            continue
        if impl.supports_device(device) is None and _ready_for_auto(name):
            names.append(name)
    return names


def resolve_backend(
    op: str | None, device: torch.device, backend: str | None = None, key: tuple | None = None,
    m: int = 0,
) -> Any:
    """The backend object that runs `op` ("lora", "series", or None for any) on `device`.

    Under auto on a GPU with several candidates, `key` (`_choice.shape_key`) and the row count
    `m` let the choice follow measurements for that shape; without them the first candidate
    in tie-break order is taken."""
    requested = _requested(backend)
    if requested != "auto":
        impl = _load(requested)
        if impl is None:
            raise BackendUnavailableError(
                f"backend {requested!r} is not available: {_load_errors.get(requested)}"
            )
        if op is not None and op not in impl.ops:
            raise BackendUnavailableError(f"backend {requested!r} does not implement {op!r}")
        why = impl.supports_device(device)
        if why is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {why}")
        return impl
    names = auto_candidates(op, device)
    if not names:
        raise BackendUnavailableError(f"no backend can run {op!r} on {device}")
    if key is not None and len(names) > 1 and _choice.applies_to(device):
        return _loaded[_choice.choose(key, m, names, device)]
    return _loaded[names[0]]


def shape_dependent(op: str, device: torch.device, backend: str | None) -> bool:
    """Whether the backend for `op` on `device` may differ from shape to shape."""
    return (
        _requested(backend) == "auto"
        and _choice.applies_to(device)
        and len(auto_candidates(op, device)) > 1
    )
