"""Backend registry and selection.

A backend is an object satisfying `_backend.Backend`, the `BACKEND` of its module; it is
imported the first time it is asked for, so a missing Triton or an unbuilt CUDA extension
costs nothing until used.

Selection: the ``backend=`` keyword, else ``LLM_ADAPTERS_BACKEND``, else ``auto``. A requested
backend that cannot run is an error (`BackendUnavailableError`), never a silent fallback.
``auto`` is a fixed rule; nothing is timed and nothing is written:

- CUDA tensors: triton; cuda for a shape where a measured table (the user's, or one shipped
  with the package: `_choice`) has cuda faster than triton, and only if the cuda extension is
  usable without compiling it (`auto` never starts a JIT build). Never torch.
- CPU tensors: torch, or triton when ``TRITON_INTERPRET=1``. Other devices: torch.
- An activation without a fused kernel (any ACT2FN name but identity, tanh, relu, gelu, silu
  and their aliases): torch on every device, the one backend that runs it. A run has one
  activation for all its adapter layers, so it still draws one mask stream.

One dropout-mask stream per run: the torch backend, whose keep-mask differs from the Philox
mask, is never auto's choice on CUDA; triton and cuda regenerate the same Philox keep-mask
bit for bit, so a run whose shapes go to both still draws one mask stream. The tables are read
once per process, so a shape keeps its backend for the whole run (a forward and its
checkpointed recomputation included). While torch.compile traces with a dynamic M the shape is
not known: such a graph runs triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch

from .._numerics import ACTIVATION_ALIASES, ACTIVATIONS, is_fused
from . import _choice
from ._backend import Backend

BACKENDS = ("torch", "triton", "cuda")


def _import_torch() -> Backend:
    from . import torch_backend

    return torch_backend.BACKEND


def _import_triton() -> Backend:
    from . import triton_backend

    return triton_backend.BACKEND


def _import_cuda() -> Backend:
    from . import cuda_backend

    return cuda_backend.BACKEND


_IMPORTS: dict[str, Callable[[], Backend]] = {
    "torch": _import_torch, "triton": _import_triton, "cuda": _import_cuda,
}
_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not installed, not built, wrong device)."""


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        backend = _IMPORTS[name]()
    except ImportError as exc:  # the backend's module, or a dependency of it, is missing
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    reason = backend.available()
    if reason is not None:
        _load_errors[name] = reason
        return None
    from ._custom import bound_op  # here, not at import: _custom is light but lazy

    for op in backend.ops:  # registered now: torch.compile cannot trace a registration
        bound_op(op, backend).register()
    _loaded[name] = backend
    return backend


def loaded_backend(name: str) -> Backend:
    """The backend object `name`, already loaded by `resolve_backend`."""
    return _loaded[name]


def backend_status(name: str) -> Optional[str]:
    """None when backend `name` is usable in this process, else the reason it is not."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    return None if _load(name) is not None else _load_errors.get(name, "not available")


def available_backends() -> list[str]:
    """Names of the backends that load in this process (not all run on every device)."""
    return [name for name in BACKENDS if _load(name) is not None]


def _requested(backend: Optional[str]) -> str:
    requested = backend or os.environ.get("LLM_ADAPTERS_BACKEND", "") or "auto"
    requested = requested.strip().lower()
    if requested != "auto" and requested not in BACKENDS:
        source = "backend=" if backend else "LLM_ADAPTERS_BACKEND="
        raise ValueError(
            f"unknown backend {source}{requested!r}: expected auto, {', '.join(BACKENDS)}"
        )
    return requested


def _on_gpu(device: torch.device) -> bool:
    """Whether `auto` applies its GPU rule to `device` (tests treat the CPU as one)."""
    return device.type == "cuda"


def _ready_for_auto(name: str) -> bool:
    """Whether `auto` may take backend `name` without compiling it first: the CUDA extension
    counts once it is loaded, built ahead of time or in the JIT cache with nothing newer in
    csrc/ (a fresh JIT build takes minutes)."""
    if name != "cuda":
        return True
    from . import cuda_backend

    return bool(cuda_backend.ready_without_compile())


def _why_not(name: str, op: Optional[str], device: torch.device) -> Optional[str]:
    """None when `auto` may take backend `name` for `op` on `device`, else the reason."""
    impl = _load(name)
    if impl is None:
        return _load_errors.get(name, "not available")
    if op is not None and op not in impl.ops:
        return f"does not implement {op!r}"
    why = impl.supports_device(device)
    if why is not None:
        return why
    if not _ready_for_auto(name):
        return "its extension is not built or loaded, and auto never starts a JIT build"
    return None


def gpu_candidates(op: Optional[str], device: torch.device) -> list[str]:
    """The backends `auto` may take for `op` on a GPU `device`: triton first, then cuda."""
    return [name for name in ("triton", "cuda") if _why_not(name, op, device) is None]


def _auto(op: Optional[str], device: torch.device, key: Optional[tuple]) -> str:
    if _on_gpu(device):
        names = gpu_candidates(op, device)
        if not names:
            reasons = "; ".join(f"{n}: {_why_not(n, op, device)}" for n in ("triton", "cuda"))
            raise BackendUnavailableError(
                f"auto: no GPU backend can run {op or 'the ops'!r} on {device} ({reasons}); the "
                f"torch backend runs there only when asked for (backend='torch' or "
                f"LLM_ADAPTERS_BACKEND=torch)"
            )
        if len(names) > 1 and key is not None and _choice.cuda_is_faster(
                key, _choice.device_name(device)):
            return "cuda"
        return names[0]
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if _why_not("triton", op, device) is None:
            return "triton"
    if _load("torch") is None:
        raise BackendUnavailableError(f"backend 'torch' is not available: {_load_errors['torch']}")
    return "torch"


def runs_activation(impl: Backend, activation: str) -> bool:
    """Whether backend `impl` runs the (canonical) activation: every backend runs the fused
    ones; a backend with `any_activation` (torch) runs every ACT2FN name."""
    return is_fused(activation) or bool(getattr(impl, "any_activation", False))


def _activation_error(requested: str, activation: str) -> BackendUnavailableError:
    aliases = ", ".join(f"{a} = {f}" for a, f in ACTIVATION_ALIASES.items())
    return BackendUnavailableError(
        f"backend {requested!r} has no kernel for activation {activation!r}: the triton and "
        f"cuda backends run {', '.join(ACTIVATIONS)} (and the ACT2FN aliases {aliases}); the "
        f"torch backend runs every name of transformers' ACT2FN. Use backend='torch' or "
        f"'auto' (LLM_ADAPTERS_BACKEND), or a fused activation"
    )


def resolve_backend(
    op: Optional[str], device: torch.device, backend: Optional[str] = None,
    key: Optional[tuple] = None, activation: Optional[str] = None,
) -> Backend:
    """The backend object that runs `op` ("lora", "series", "lora_add", or None for any) on
    `device`.

    Under auto on a GPU, `key` (`_choice.shape_key`) lets a measured table send that shape to
    the cuda backend; without it the answer is the first GPU candidate (triton).
    `activation` (a canonical name, `_numerics.canonical_activation`): auto takes torch for
    one without a fused kernel; a backend asked for by name that lacks it is an error."""
    requested = _requested(backend)
    if requested == "auto":
        if activation is not None and not is_fused(activation):
            if _load("torch") is None:
                raise BackendUnavailableError(
                    f"backend 'torch' is not available: {_load_errors['torch']}")
            return _loaded["torch"]
        return _loaded[_auto(op, device, key)]
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
    if activation is not None and not runs_activation(impl, activation):
        raise _activation_error(requested, activation)
    return impl


def shape_dependent(op: str, device: torch.device, backend: Optional[str]) -> bool:
    """Whether the backend for `op` on `device` may differ from shape to shape: under auto on a
    GPU where both triton and cuda can run and a table compares them for `op`."""
    return (
        _requested(backend) == "auto"
        and _on_gpu(device)
        and len(gpu_candidates(op, device)) > 1
        and _choice.has_rows(_choice.device_name(device), op)
    )
