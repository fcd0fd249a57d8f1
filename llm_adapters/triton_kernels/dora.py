"""DoRA on the LoRA kernels: the per-output-column scale c = m / ‖W + s·B A‖_row fused into
their epilogues (the contract of `ops/_backend.py`, dora_forward / dora_add_forward and their
backwards).

    T = x Wᵀ + s·(D(x) Aᵀ) Bᵀ   (or y0 + the branch)      y = c ⊙ T + bias

forward   `lora._shrink_kernel` for S = D(x) Aᵀ, then `lora._main_kernel` with COL_SCALE: the
          fp32 accumulator T is multiplied by c before the bias is added, one rounding; SAVE_T
          also stores round(T) (what d c needs) from the same tile.
backward  with gc = c ⊙ g, never materialised for dora_backward:
          one `_reduce_kernel` pass over g gives g (c ⊙ B) = gc B (rows) and gᵀ S (columns,
          times s·c: dB); dS = s·gc B; `_dx_kernel` with COL_SCALE scales the g tiles by c as
          it loads them: dx = gc W + D'(dS A); dA as for LoRA. dbias = Σ g and dc = Σ g ⊙ T
          are N-sized reductions done in PyTorch (fp32).
dora_add: y0 (a base output without its bias) starts the accumulator; dx = D'(dS A) only and
          dy0 = gc (the base layer's own backward takes it from there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import acc_dtype, dropout_threshold
from . import lora


def _col(col_scale: Tensor, n: int) -> Tensor:
    if col_scale.shape != (n,):
        raise ValueError(f"col_scale has shape {tuple(col_scale.shape)}; expected ({n},)")
    return col_scale.to(torch.float32).contiguous()


def dora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, col_scale: Tensor,
    scaling: float, p: float, seed: int, save_t: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = c ⊙ (x Wᵀ + s·(D(x) Aᵀ) Bᵀ) + bias. x [M, K], weight [N, K] (any strides, x.dtype),
    bias [N] | None, a [r, K], b [N, r], col_scale [N]. Returns (y [M, N] x.dtype, s_pre [M, r]
    fp32, an empty bool mask (regenerated from `seed` in backward), t = round(T) [M, N] when
    save_t, else an empty [0] tensor of x.dtype)."""
    lora._check(x, weight, a, b)
    return lora._forward(x, weight, bias, None, a, b, None, None, None, scaling, p, seed,
                         "identity", col=_col(col_scale, b.shape[0]), save_t=bool(save_t))


def dora_add_forward(
    x: Tensor, y0: Tensor, a: Tensor, b: Tensor, bias: Tensor | None, col_scale: Tensor,
    scaling: float, p: float, seed: int, save_t: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = c ⊙ (y0 + s·(D(x) Aᵀ) Bᵀ) + bias, y0 [M, N] (x.dtype, any strides) a base output
    without its bias, read once and not written. Results as `dora_forward`."""
    lora._check(x, y0, a, b, "y0")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return lora._forward(x, None, bias, y0, a, b, None, None, None, scaling, p, seed,
                         "identity", col=_col(col_scale, b.shape[0]), save_t=bool(save_t))


def dora_backward(
    g: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, col_scale: Tensor,
    scaling: float, p: float, seed: int, s_pre: Tensor, mask: Tensor, t: Tensor, needs,
) -> tuple[Tensor, ...]:
    """Gradients of `dora_forward` for g = dL/dy [M, N]. needs = (dx, dbias, da, db, dcol);
    returns those 5 tensors: dx [M, K] g.dtype, dbias [N], da [r, K], db [N, r], dcol [N] fp32
    (an empty [0] tensor where not needed). `t` is the forward's saved T (needed for dcol);
    `mask` is unused: the keep-mask is regenerated from `seed`."""
    need_dx, need_bias, need_a, need_b, need_col = (bool(v) for v in needs)
    out = _backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, t,
                    need_dx, need_a, need_b, need_bias, need_col)
    dx, _, d_a, d_b, d_bias, d_col = out
    return dx, d_bias, d_a, d_b, d_col


def dora_add_backward(
    g: Tensor, x: Tensor, a: Tensor, b: Tensor, col_scale: Tensor, scaling: float, p: float,
    seed: int, s_pre: Tensor, mask: Tensor, t: Tensor, needs,
) -> tuple[Tensor, ...]:
    """Gradients of `dora_add_forward`. needs = (dx, dy0, da, db, dbias, dcol); returns those
    6 tensors: dx = D'(dS A) only (the base layer's backward adds its part through y0) and
    dy0 = c ⊙ g in g.dtype, the others as `dora_backward`."""
    need_dx, need_y0, need_a, need_b, need_bias, need_col = (bool(v) for v in needs)
    return _backward(g, x, None, a, b, col_scale, scaling, p, seed, s_pre, t,
                     need_dx, need_a, need_b, need_bias, need_col, need_y0)


def _backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, t,
              need_dx, need_a, need_b, need_bias, need_col, need_y0=False):
    """-> (dx, dy0, da, db, dbias, dcol); weight None: dora_add (no base term in dx)."""
    m, k = x.shape
    n, r = b.shape
    if need_col and t.dim() != 2:  # an empty [0]: no T kept
        raise RuntimeError("the DoRA column scale needs a gradient, but its forward ran with "
                           "save_t=False and kept no T")
    acc = acc_dtype(g.dtype)
    c = _col(col_scale, n)
    thr, inv_keep = dropout_threshold(p)
    dropout = p > 0.0 and thr > 0
    s_pre = s_pre.contiguous()

    def empty(dtype=acc):
        return g.new_empty(0, dtype=dtype)

    need_gb = need_dx or need_a
    gb = d_b = None
    if (need_gb or need_b) and m > 0 and n > 0:
        # One pass over g: g (c ⊙ B) = gc B (rows) and gᵀ S (columns).
        bc = b.to(torch.float32) * c[:, None]
        gb, d_b = lora._reduce(g, bc, s_pre, "identity", 0.0, 0, need_gb, need_b, r)
    elif need_gb or need_b:
        gb = torch.zeros((m, r), dtype=acc, device=g.device)
        d_b = torch.zeros((n, r), dtype=acc, device=g.device)
    ds = gb.mul_(scaling) if need_gb else None
    if need_dx:
        dx = lora._dx(g, weight, ds, a, k, seed, p, None if weight is None else c)
    else:
        dx = empty(g.dtype)
    d_a = empty()
    if need_a:
        if m > 0 and k > 0:
            # dAᵀ = D(x)ᵀ dS: the column reduction over x, the mask regenerated in registers.
            _, cols = lora._reduce(x, None, ds, "identity", p if dropout else 0.0, seed,
                                   False, True, r)
            d_a = cols.t().contiguous()
            if dropout:
                d_a.mul_(inv_keep)
        else:
            d_a = torch.zeros((r, k), dtype=acc, device=g.device)
    if need_b:
        d_b = d_b.mul_(c[:, None]).mul_(scaling)
    d_bias = g.sum(0, dtype=acc) if need_bias else empty()
    if need_col:
        if t.shape != g.shape:
            raise ValueError(f"dcol needs the forward's t {tuple(g.shape)} (save_t=True); "
                             f"got shape {tuple(t.shape)}")
        d_col = (g.to(acc) * t.to(acc)).sum(0)
    else:
        d_col = empty()
    dy0 = (g * c).to(g.dtype) if need_y0 else empty(g.dtype)
    return dx, dy0, d_a, d_b if need_b else empty(), d_bias, d_col
