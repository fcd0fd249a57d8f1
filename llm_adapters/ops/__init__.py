"""Functional adapter ops with autograd and backend dispatch (torch | triton | cuda).

    y = lora_linear(x, weight, bias, lora_a, lora_b, scaling=2.0, dropout_p=0.0)
    y = lora_linear(x, weight, bias, down, up, scaling=1.0, activation="tanh")  # parallel
    y = lora_add(y0, x, lora_a, lora_b, scaling=2.0)  # the branch into a base output y0
    z = series_adapter(h, down, up, scaling=1.0, activation="tanh", dropout_p=0.0)
    y = dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling=2.0)  # DoRA
    y = dora_add(y0, x, weight, bias, lora_a, lora_b, magnitude, scaling=2.0)  # on y0
    y0 = lora_grouped_add(y0, x, adapter_index, [a0, a1], [b0, b1], [2.0, 1.0])  # per-row

Every input is validated here, once, so each backend sees 2-D contiguous activations and
consistent shapes, dtypes and devices.

`activation` is any name of transformers' ACT2FN, as in LLM-Adapters, or "identity". The
fused kernels implement identity, tanh, relu, gelu and silu (and the aliases linear, swish,
gelu_python, which compute the same functions); every other name runs on the torch backend as
plain PyTorch autograd with transformers' module (`auto` picks it on every device; triton or
cuda asked for by name is a clear error).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .._numerics import ACTIVATIONS, all_activations, canonical_activation, is_fused
from . import _dispatch
from ._choice import shape_key
from ._custom import BoundOp, bound_op
from ._dispatch import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    backend_status,
    loaded_backend,
    resolve_backend,
    shape_dependent,
)
from .dora import dora_add, dora_linear  # noqa: E402  (uses the package's lora_linear)
from .grouped import lora_grouped_add

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "BackendUnavailableError",
    "all_activations",
    "available_backends",
    "backend_status",
    "canonical_activation",
    "dora_add",
    "dora_linear",
    "dropout_mask",
    "lora_add",
    "lora_grouped_add",
    "lora_linear",
    "new_seed",
    "resolve_backend",
    "series_adapter",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
Scale = Union[float, Tensor]


def new_seed() -> Tensor:
    """A fresh dropout seed drawn from torch's CPU generator (so `torch.manual_seed` and the
    RNG-state replay of activation checkpointing reproduce it); a 0-dim int64 CPU tensor."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


_NO_SEED = torch.zeros((), dtype=torch.int64)  # read-only placeholder when nothing is dropped


def _seed_tensor(seed: Union[int, Tensor, None], dropout_p: float) -> Tensor:
    if seed is None:
        return new_seed() if dropout_p > 0 else _NO_SEED
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"seed must be an int or a one-element int64 tensor, got {seed!r}")
        return seed.reshape(()).cpu()
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    return torch.tensor(seed, dtype=torch.int64)


def _check_tensor(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the input is on {device}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")


def _check_common(
    x: Tensor, x_name: str, rank: int, dropout_p: float, activation: str, scaling: Scale
) -> str:
    """Checks what every op takes; returns the canonical activation name."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{x_name} must have at least one dimension, got a 0-dim tensor")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{x_name} has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if rank < 1:
        raise ValueError(f"the adapter rank must be at least 1, got {rank}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    activation = canonical_activation(activation)
    if isinstance(scaling, Tensor):
        if scaling.numel() != 1:
            raise ValueError(f"a tensor scaling must have one element, got shape {scaling.shape}")
        if scaling.device != x.device:
            raise ValueError(f"scaling is on {scaling.device}, but {x_name} is on {x.device}")
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or a one-element tensor, got {scaling!r}")
    return activation


def _check_branch(
    x: Tensor, lora_a: Tensor, lora_b: Tensor, lora_a_bias: Optional[Tensor],
    lora_b_bias: Optional[Tensor], dropout_p: float, activation: str, scaling: Scale,
    base: Optional[Tensor] = None,
) -> tuple[str, int, int, int]:
    """The checks `lora_linear` and `lora_add` share: x, the low-rank branch (A, B and their
    biases), dropout, activation and scaling; with `base` (lora_linear's weight [N, K]) N is
    its, else lora_b's. Returns (canonical activation, k, n, r)."""
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b), ("weight", base)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    activation = _check_common(
        x, "x", lora_a.shape[0] if lora_a.dim() else 0, dropout_p, activation, scaling)
    k = x.shape[-1]
    if base is not None:
        if base.dim() != 2 or base.shape[1] != k:
            raise ValueError(
                f"weight has shape {tuple(base.shape)}, expected [N, {k}] for x [..., {k}]"
            )
        n = base.shape[0]
    elif lora_b.dim() != 2:
        raise ValueError(f"lora_b must be 2-D [N, r], got shape {tuple(lora_b.shape)}")
    else:
        n = lora_b.shape[0]
    if lora_a.dim() != 2:
        raise ValueError(f"lora_a must be 2-D [r, {k}], got shape {tuple(lora_a.shape)}")
    r = lora_a.shape[0]
    _check_tensor("lora_a", lora_a, (r, k), x.device)
    _check_tensor("lora_b", lora_b, (n, r), x.device)
    if lora_a_bias is not None:
        _check_tensor("lora_a_bias", lora_a_bias, (r,), x.device)
    if lora_b_bias is not None:
        _check_tensor("lora_b_bias", lora_b_bias, (n,), x.device)
    return activation, k, n, r


def _split_scale(scaling: Scale) -> tuple[Optional[Tensor], float]:
    if isinstance(scaling, Tensor):
        return scaling.reshape(()), 1.0
    return None, float(scaling)


def _backend_name(op: str, device_type: str, requested: str, key: Optional[tuple] = None) -> str:
    # Runs eagerly even while torch.compile traces a caller (its result is a constant of the
    # graph), so the first call may import a backend and create its custom ops mid-trace.
    return resolve_backend(op, torch.device(device_type), requested or None, key).name


# What torch.compiler.assume_constant_result(_backend_name) does; the decorator itself imports
# torch._dynamo (and with it Triton), seconds of import time for every user of the package.
# tests/test_ops_torch.py checks that the decorator still sets exactly this attribute.
_backend_name._dynamo_marked_constant = True


def _unfused_backend_name(op: str, device_type: str, requested: str, activation: str) -> str:
    """The backend of an activation without a fused kernel: torch under auto; a backend asked
    for by name that lacks it is a BackendUnavailableError saying which backend runs what."""
    return resolve_backend(op, torch.device(device_type), requested or None,
                           activation=activation).name


_unfused_backend_name._dynamo_marked_constant = True


def _unfused(op: str, x: Tensor, requested: Optional[str], activation: str):
    """The backend object for `op` with an activation that no kernel fuses (see
    `torch_backend.*_composite`: plain PyTorch autograd with transformers' module as φ)."""
    return loaded_backend(_unfused_backend_name(op, x.device.type, requested or "", activation))


# eager: the op per (op, device type, keyword, environment); where a table may send shapes of
# it to different GPU backends (see _dispatch.shape_dependent), a dict per raw shape instead
_resolved: dict[tuple[str, ...], Any] = {}


def _op(op: str, x: Tensor, requested: Optional[str], n: int, r: int, p: float) -> BoundOp:
    """The op on the backend chosen for it; the choice is made once per shape and remembered."""
    device = x.device
    if torch.compiler.is_compiling():
        m = x.shape[0]
        key = None
        if isinstance(m, int) and _dispatch._on_gpu(device):  # not for a dynamic (symbolic) M
            key = shape_key(op, x.dtype, m, x.shape[1], n, r, p > 0)
        return bound_op(op, loaded_backend(_backend_name(op, device.type, requested or "", key)))
    env = os.environ
    ekey = (op, device.type, requested or "", env.get("LLM_ADAPTERS_BACKEND", ""),
            env.get("TRITON_INTERPRET", ""))
    impl = _resolved.get(ekey)
    if impl is None:
        if shape_dependent(op, device, requested):
            impl = _resolved[ekey] = {}
        else:
            impl = _resolved[ekey] = bound_op(op, resolve_backend(op, device, requested))
    if type(impl) is dict:
        # looked up by the raw shape on every call; the bucketed key is built only on a miss
        m = x.shape[0]
        raw = (device.index, x.dtype, m, x.shape[1], n, r, p > 0)
        choice = impl.get(raw)
        if choice is None:
            key = shape_key(op, x.dtype, m, x.shape[1], n, r, p > 0)
            choice = impl[raw] = bound_op(op, resolve_backend(op, device, requested, key))
        return choice
    return impl


def _rows(t: Tensor, width: int) -> Tensor:
    # reshape is a view for contiguous inputs; copy only when the layout needs it
    return t.reshape(-1, width).contiguous()


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Scale = 1.0,
    dropout_p: float = 0.0,
    activation: str = "identity",
    seed: Union[int, Tensor, None] = None,
    lora_a_bias: Optional[Tensor] = None,
    lora_b_bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b — LoRA (φ = identity) and parallel adapters.

    x: [..., K]; weight: [N, K] (frozen; a transposed view is fine); bias: [N] or None;
    lora_a: [r, K]; lora_b: [N, r]; scaling: float, or a one-element tensor (learned);
    dropout_p: inverted dropout on the branch input; seed: the dropout seed (drawn from torch's
    CPU generator when None). Adapter weights may be float32 while x is half precision: they
    are cast to x's dtype; x is never upcast. Returns [..., N] in x's dtype.
    """
    activation, k, n, r = _check_branch(x, lora_a, lora_b, lora_a_bias, lora_b_bias, dropout_p,
                                        activation, scaling, base=weight)
    _check_tensor("weight", weight, (n, k), x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the base weight must be frozen (requires_grad=False): lora_linear computes no "
            "gradient for it"
        )
    if bias is not None:
        _check_tensor("bias", bias, (n,), x.device)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    x2 = _rows(x, k)
    scale_t, scale_f = _split_scale(scaling)
    lead = x.shape[:-1]
    if not is_fused(activation):
        y = _unfused("lora", x2, backend, activation).lora_composite(
            x2, weight, bias, lora_a, lora_b, lora_a_bias, lora_b_bias, scale_t, scale_f,
            float(dropout_p), int(_seed_tensor(seed, dropout_p)), activation)
        return y.view(*lead, n)
    op = _op("lora", x2, backend, n, r, float(dropout_p))
    args = (
        x2, weight, bias, lora_a, lora_b, lora_a_bias, lora_b_bias, scale_t, scale_f,
        float(dropout_p), _seed_tensor(seed, dropout_p), activation,
    )
    if torch.compiler.is_compiling():
        y = op.custom(*args)[0]
    else:
        y = op.eager(*args)
    return y.view(*lead, n)


def lora_add(
    y0: Tensor,
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Scale = 1.0,
    dropout_p: float = 0.0,
    activation: str = "identity",
    seed: Union[int, Tensor, None] = None,
    lora_a_bias: Optional[Tensor] = None,
    lora_b_bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """y = y0 + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b — the LoRA / parallel branch of `lora_linear`
    added into a base output y0 [..., N] that the caller computed (a quantized layer's own
    product: bitsandbytes 4-bit / 8-bit, torchao NF4). Gradients: dy0 = g (so autograd runs
    the base layer's own backward for its part of dx), dx gets the branch's D'(dS A), and the
    adapter gradients are those of `lora_linear` with the same dropout mask for a seed.
    y0 must have x's dtype; other arguments, and the backend rule, as in `lora_linear`.

    Returns a new tensor [..., N]; y0 is read once and never written, on every backend (an
    in-place add would move the same bytes and could corrupt a y0 that the base layer's
    backward, or the caller, still holds).
    """
    activation, k, n, r = _check_branch(x, lora_a, lora_b, lora_a_bias, lora_b_bias, dropout_p,
                                        activation, scaling)
    _check_tensor("y0", y0, (*x.shape[:-1], n), x.device)
    if y0.dtype != x.dtype:
        raise TypeError(f"y0 dtype {y0.dtype} does not match x dtype {x.dtype}")
    x2, y2 = _rows(x, k), _rows(y0, n)
    scale_t, scale_f = _split_scale(scaling)
    lead = x.shape[:-1]
    if not is_fused(activation):
        y = _unfused("lora_add", x2, backend, activation).lora_add_composite(
            x2, y2, lora_a, lora_b, lora_a_bias, lora_b_bias, scale_t, scale_f,
            float(dropout_p), int(_seed_tensor(seed, dropout_p)), activation)
        return y.view(*lead, n)
    op = _op("lora_add", x2, backend, n, r, float(dropout_p))
    args = (
        x2, y2, lora_a, lora_b, lora_a_bias, lora_b_bias, scale_t, scale_f, float(dropout_p),
        _seed_tensor(seed, dropout_p), activation,
    )
    y = op.custom(*args)[0] if torch.compiler.is_compiling() else op.eager(*args)
    return y.view(*lead, n)


def series_adapter(
    h: Tensor,
    down: Tensor,
    up: Tensor,
    scaling: Scale = 1.0,
    activation: str = "tanh",
    dropout_p: float = 0.0,
    seed: Union[int, Tensor, None] = None,
    down_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b — the series bottleneck adapter (AdapterH/P).

    h: [..., N]; down: [r, N]; up: [N, r]; other arguments as in `lora_linear`.
    Returns [..., N] in h's dtype.
    """
    activation = _check_common(
        h, "h", down.shape[0] if down.dim() else 0, dropout_p, activation, scaling)
    n = h.shape[-1]
    if down.dim() != 2:
        raise ValueError(f"down must be 2-D [r, {n}], got shape {tuple(down.shape)}")
    r = down.shape[0]
    _check_tensor("down", down, (r, n), h.device)
    _check_tensor("up", up, (n, r), h.device)
    if down_bias is not None:
        _check_tensor("down_bias", down_bias, (r,), h.device)
    if up_bias is not None:
        _check_tensor("up_bias", up_bias, (n,), h.device)
    h2 = _rows(h, n)
    scale_t, scale_f = _split_scale(scaling)
    lead = h.shape[:-1]
    if not is_fused(activation):
        z = _unfused("series", h2, backend, activation).series_composite(
            h2, down, up, down_bias, up_bias, scale_t, scale_f, float(dropout_p),
            int(_seed_tensor(seed, dropout_p)), activation)
        return z.view(*lead, n)
    op = _op("series", h2, backend, n, r, float(dropout_p))
    args = (
        h2, down, up, down_bias, up_bias, scale_t, scale_f, float(dropout_p),
        _seed_tensor(seed, dropout_p), activation,
    )
    if torch.compiler.is_compiling():
        z = op.custom(*args)[0]
    else:
        z = op.eager(*args)
    return z.view(*lead, n)


def dropout_mask(
    shape: tuple[int, ...],
    dropout_p: float,
    seed: Union[int, Tensor],
    device: Union[str, torch.device] = "cpu",
    backend: Optional[str] = None,
) -> Tensor:
    """The bool keep-mask (True = kept) that `backend` uses for this seed and the 2-D input
    shape [M, K] (the flattened x of lora_linear, or h of series_adapter). Kept elements are
    scaled by 1 / (realised keep probability); see each backend for how p is realised."""
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    device = torch.device(device)
    impl = resolve_backend(None, device, backend)
    return impl.keep_mask(tuple(shape), float(dropout_p), int(_seed_tensor(seed, 1.0)), device)
