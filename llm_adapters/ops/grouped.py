"""Mixed-adapter LoRA batches (SGMV style, as Punica / S-LoRA): several LoRA adapters served
in one batch, inference only.

    y = lora_grouped_add(y0, x, adapter_index, lora_as, lora_bs, scalings)
    # row i with adapter a = adapter_index[i] >= 0:  y[i] = y0[i] + s_a · (x[i] A_aᵀ) B_aᵀ
    # rows with adapter_index -1 ("__base__"): y[i] = y0[i]

x [M, K], y0 [M, N] (the base output, updated in place and returned), adapter_index int64
[M] in {-1, 0..G-1}, lora_as G tensors [r_g, K], lora_bs G tensors [N, r_g] (ranks may
differ), scalings G numbers. The adapter weights may have another float dtype than x: they are
cast to it (never the activations to theirs). No autograd: an input that requires grad under
grad mode is refused.

Backends (`backend=`, else LLM_ADAPTERS_BACKEND, else auto, resolved as the other ops are by
`_dispatch.resolve_backend`): torch, the reference (rows segmented by adapter with one argsort,
then per segment index_select, two small GEMMs and index_add_; no per-row loop), and triton
(`triton_kernels.grouped`: one shrink and one expand launch over all segments). Auto: triton
on CUDA tensors and on CPU under TRITON_INTERPRET=1, torch on CPU otherwise. There is no cuda
kernel for this op: asking for it is an error.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ._dispatch import BackendUnavailableError, resolve_backend

__all__ = ["lora_grouped_add"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BASE_INDEX = -1  # adapter_index of a row that gets no adapter ("__base__")


def _check_list(name: str, value, g: Optional[int]) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a list (one entry per adapter), got {type(value).__name__}")
    value = list(value)
    if g is not None and len(value) != g:
        raise ValueError(f"{name} has {len(value)} entries but lora_as has {g}: one per adapter")
    return value


def _validate(y0, x, adapter_index, lora_as, lora_bs, scalings):
    """Checks every input; returns (lora_as, lora_bs, scalings as floats)."""
    for name, t in (("y0", y0), ("x", x), ("adapter_index", adapter_index)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    if y0.dim() != 2:
        raise ValueError(f"y0 must be 2-D [M, N], got shape {tuple(y0.shape)}")
    m, k = x.shape
    n = y0.shape[1]
    if y0.shape[0] != m:
        raise ValueError(f"y0 has {y0.shape[0]} rows but x has {m}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16, float32 or float64")
    if y0.dtype != x.dtype:
        raise TypeError(f"y0 dtype {y0.dtype} does not match x dtype {x.dtype}")
    if y0.device != x.device:
        raise ValueError(f"y0 is on {y0.device} but x is on {x.device}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"adapter_index must be int64, got {adapter_index.dtype}")
    if adapter_index.dim() != 1 or adapter_index.shape[0] != m:
        raise ValueError(
            f"adapter_index must be 1-D with one entry per row of x ({m}), got shape "
            f"{tuple(adapter_index.shape)}"
        )
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {x.device}")
    lora_as = _check_list("lora_as", lora_as, None)
    g = len(lora_as)
    lora_bs = _check_list("lora_bs", lora_bs, g)
    scalings = _check_list("scalings", scalings, g)
    for i in range(g):
        a, b = lora_as[i], lora_bs[i]
        for name, t in ((f"lora_as[{i}]", a), (f"lora_bs[{i}]", b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{name} has dtype {t.dtype}; expected a floating dtype")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if a.shape[0] < 1 or a.shape[1] != k:
            raise ValueError(f"lora_as[{i}] must be [r, K={k}] with r >= 1, got {tuple(a.shape)}")
        if tuple(b.shape) != (n, a.shape[0]):
            raise ValueError(
                f"lora_bs[{i}] must be [N={n}, r={a.shape[0]}] (r from lora_as[{i}]), got "
                f"{tuple(b.shape)}"
            )
    floats = []
    for i, s in enumerate(scalings):
        if isinstance(s, Tensor) and s.numel() == 1 and not s.requires_grad:
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise TypeError(f"scalings[{i}] must be a finite real number, got {s!r}")
        floats.append(float(s))
    if m > 0:
        lo, hi = (int(v) for v in torch.aminmax(adapter_index))
        if lo < BASE_INDEX or hi >= g:
            bad = lo if lo < BASE_INDEX else hi
            raise ValueError(
                f"adapter_index holds {bad}: expected -1 (no adapter) or 0..{g - 1} "
                f"({g} adapter{'s' if g != 1 else ''})"
            )
    if torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, y0, *lora_as, *lora_bs)
    ):
        raise RuntimeError(
            "mixed-adapter batches are inference only: an input requires grad (run under "
            "torch.no_grad() or torch.inference_mode(), or detach the inputs)"
        )
    return lora_as, lora_bs, floats


def _torch_grouped_add(y0, x, adapter_index, lora_as, lora_bs, scalings):
    """The reference: one argsort segments the rows; per adapter with rows, index_select, two
    GEMMs (the scale in the second's alpha) and index_add_ into y0."""
    g = len(lora_as)
    order = torch.argsort(adapter_index, stable=True)
    counts = torch.bincount(adapter_index + 1, minlength=g + 1).tolist()
    start = counts[0]  # base rows sort first
    for i in range(g):
        c = counts[i + 1]
        if c == 0:  # an adapter with no rows in this batch
            continue
        rows = order[start : start + c]
        start += c
        a = lora_as[i].to(x.dtype)
        b = lora_bs[i].to(x.dtype)
        s = x.index_select(0, rows) @ a.t()
        d = torch.addmm(s.new_zeros(()), s, b.t(), beta=0.0, alpha=scalings[i])
        y0.index_add_(0, rows, d)
    return y0


def lora_grouped_add(
    y0: Tensor,
    x: Tensor,
    adapter_index: Tensor,
    lora_as: Sequence[Tensor],
    lora_bs: Sequence[Tensor],
    scalings: Sequence[float],
    backend: Optional[str] = None,
) -> Tensor:
    """y0[i] += s_a · (x[i] A_aᵀ) B_aᵀ for every row i whose adapter a = adapter_index[i] is
    not -1, in place; returns y0. See the module docstring for shapes and backends."""
    lora_as, lora_bs, scalings = _validate(y0, x, adapter_index, lora_as, lora_bs, scalings)
    impl = resolve_backend(None, x.device, backend)
    if impl.name == "torch":
        with torch.no_grad():
            return _torch_grouped_add(y0, x, adapter_index, lora_as, lora_bs, scalings)
    if impl.name != "triton":
        raise BackendUnavailableError(
            f"backend {impl.name!r} has no mixed-adapter kernel: lora_grouped_add runs on "
            f"'triton' or 'torch'"
        )
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(
            f"the triton backend runs float16, bfloat16 and float32; x has {x.dtype} "
            f"(use backend='torch')"
        )
    if not lora_as or x.shape[0] == 0 or y0.shape[1] == 0:
        return y0
    from ..triton_kernels.grouped import grouped_lora_add

    with torch.no_grad():
        return grouped_lora_add(y0, x, adapter_index, lora_as, lora_bs, scalings)
