"""The `torch` backend: plain PyTorch in the fused order. The CPU path and the reference.

Every backend implements the same four functions on 2-D, validated inputs:

lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)
    x [M, K], weight [N, K] (any strides; x.dtype), bias [N] | None, a [r, K], b [N, r],
    a_bias [r] | None, b_bias [N] | None, scale_t: 0-dim learned scale | None (then `scaling`),
    p: dropout probability, seed: int, activation: a name from ACTIVATIONS.
    -> (y [M, N] x.dtype, s_pre [M, r] = D(x) aᵀ + a_bias in acc_dtype(x.dtype), mask)
lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs)
    needs = (dx, dbias, da, db, da_bias, db_bias, dscale) booleans
    -> 7 tensors in that order: dx in g.dtype, the others in acc_dtype(g.dtype) (the wrapper
    casts each to its input's dtype); where not needed, an empty [0] tensor of that dtype.
    acc_dtype is float32, or float64 for float64 inputs (gradcheck).
series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation)
    h [M, N], down [r, N], up [N, r] -> (z [M, N], s_pre [M, r] acc dtype, mask)
series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs)
    needs = (dh, ddown, dup, ddown_bias, dup_bias, dscale) -> 6 tensors, dtypes as above.

Memory traffic (LoRA forward, M tokens): the base GEMM reads x and W and writes y once;
the branch reads x once more for the shrink and adds a rank-r product into y in place
(addmm_, no separate [M, N] branch output). With dropout the masked x is a temporary for the
shrink GEMM only; what is kept for backward is the bool keep-mask (1 byte an element), never a
masked copy of x. PEFT keeps a float copy of the dropped x and a mask.

Dropout on this backend: drawing random numbers is what costs on a CPU. One 64-bit draw gives
four 16-bit lanes; an element is kept when its lane is >= round(p * 65536). So p is realised
to 1/65536 and the inverted-dropout scale uses the realised keep probability, keeping the
estimator unbiased. The mask for a seed is `keep_mask(shape, p, seed, device)`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._activations import activation_grad, apply_activation

_LANES = 65536


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold on a uniform 16-bit lane, 1 / realised keep probability)."""
    t = int(round(p * _LANES))
    t = min(max(t, 0), _LANES - 1)
    return t, _LANES / (_LANES - t)


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """The bool keep-mask this backend uses for `seed` and `shape` (True = kept)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    t, _ = dropout_threshold(p)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)  # full 64-bit range: four uniform 16-bit lanes
    lanes = words.view(torch.int16)[:numel]
    return (lanes >= t - _LANES // 2).view(shape)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the rank-sized intermediates: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or acc_dtype(ref.dtype))


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where is about 8x cheaper on CPU than x * mask (no bool -> float promotion pass).
    return torch.where(mask, x, 0.0)


def _scale_of(scale_t: Tensor | None, scaling: float, dtype: torch.dtype) -> Tensor | float:
    return scaling if scale_t is None else scale_t.to(dtype)


def _shrink(x: Tensor, a: Tensor, a_bias: Tensor | None, p: float, seed: int):
    """S = D(x) aᵀ + a_bias in float32, and the keep-mask (empty when p == 0)."""
    a_ = a.to(x.dtype)
    if p > 0.0:
        mask = keep_mask(tuple(x.shape), p, seed, x.device)
        _, inv_keep = dropout_threshold(p)
        s = _masked(x, mask) @ a_.t()
        s = s.to(acc_dtype(x.dtype)).mul_(inv_keep)  # scale the rank-sized result, not x
    else:
        mask = x.new_empty(0, dtype=torch.bool)
        s = (x @ a_.t()).to(acc_dtype(x.dtype))
    if a_bias is not None:
        s = s.add_(a_bias.to(s.dtype))
    return s, mask


def _dropped_t_matmul(ds: Tensor, x: Tensor, mask: Tensor, p: float) -> Tensor:
    """dSᵀ D(x): the gradient of the down/A projection, [r, K]."""
    if p > 0.0:
        _, inv_keep = dropout_threshold(p)
        return (ds.t() @ _masked(x, mask)).mul_(inv_keep)
    return ds.t() @ x


def _add_dropped(out: Tensor, ds: Tensor, a: Tensor, mask: Tensor, p: float, inplace: bool):
    """out + D'(dS a); in place into `out` when `inplace`."""
    if p > 0.0:
        _, inv_keep = dropout_threshold(p)
        t = _masked(ds @ a, mask)
        return out.add_(t, alpha=inv_keep) if inplace else torch.add(out, t, alpha=inv_keep)
    return out.addmm_(ds, a) if inplace else torch.addmm(out, ds, a)


def _branch_grads(g, h_act, s_pre, up, scale_t, scaling, activation, need_up, need_scale):
    """From g: d(up) = s gᵀ φ(S), dS = s (g up) ⊙ φ'(S), d(scale) = Σ (g up) ⊙ φ(S)."""
    dt, acc = g.dtype, acc_dtype(g.dtype)
    gu = (g @ up.to(dt)).to(acc)  # [M, r]
    s = _scale_of(scale_t, scaling, acc)
    d_up = (g.t() @ h_act.to(dt)).to(acc).mul_(s) if need_up else None
    d_scale = (gu * h_act).sum() if need_scale else None
    ds = gu.mul_(s)
    grad = activation_grad(s_pre, activation)
    if grad is not None:
        ds.mul_(grad)
    return ds, d_up, d_scale


def lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    s_pre, mask = _shrink(x, a, a_bias, p, seed)
    h_act = apply_activation(s_pre, activation).to(x.dtype)
    if b_bias is not None:  # b_bias is not scaled: fold it into the base bias (N-sized)
        bias = b_bias.to(x.dtype) if bias is None else bias + b_bias.to(x.dtype)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if scale_t is None:
        y.addmm_(h_act, b.to(x.dtype).t(), alpha=scaling)
    else:
        y.addmm_(h_act * scale_t.to(x.dtype), b.to(x.dtype).t())
    return y, s_pre, mask


def lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    need_dx, need_bias, need_a, need_b, need_ab, need_bb, need_scale = needs
    h_act = apply_activation(s_pre, activation)
    ds, d_b, d_scale = _branch_grads(
        g, h_act, s_pre, b, scale_t, scaling, activation, need_b, need_scale
    )
    dt = g.dtype
    ds_ = ds.to(dt)
    dx = _empty(g, g.dtype)
    if need_dx:
        dx = _add_dropped(g @ weight, ds_, a.to(dt), mask, p, inplace=True)
    d_a = _dropped_t_matmul(ds_, x, mask, p).to(ds.dtype) if need_a else _empty(g)
    g_sum = g.to(ds.dtype).sum(0) if (need_bias or need_bb) else None
    return (
        dx,
        g_sum.clone() if need_bias else _empty(g),
        d_a,
        d_b if need_b else _empty(g),
        ds.sum(0) if need_ab else _empty(g),
        g_sum if need_bb else _empty(g),
        d_scale if need_scale else _empty(g),
    )


def series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation):
    s_pre, mask = _shrink(h, down, down_bias, p, seed)
    h_act = apply_activation(s_pre, activation).to(h.dtype)
    up_ = up.to(h.dtype)
    if scale_t is None:
        z = torch.addmm(h, h_act, up_.t(), alpha=scaling)
    else:
        z = torch.addmm(h, h_act * scale_t.to(h.dtype), up_.t())
    if up_bias is not None:
        z.add_(up_bias.to(h.dtype))
    return z, s_pre, mask


def series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    need_dh, need_down, need_up, need_db, need_ub, need_scale = needs
    h_act = apply_activation(s_pre, activation)
    ds, d_up, d_scale = _branch_grads(
        g, h_act, s_pre, up, scale_t, scaling, activation, need_up, need_scale
    )
    dt = g.dtype
    ds_ = ds.to(dt)
    dh = _add_dropped(g, ds_, down.to(dt), mask, p, inplace=False) if need_dh else _empty(g, dt)
    d_down = _dropped_t_matmul(ds_, h, mask, p).to(ds.dtype) if need_down else _empty(g)
    return (
        dh,
        d_down,
        d_up if need_up else _empty(g),
        ds.sum(0) if need_db else _empty(g),
        g.to(ds.dtype).sum(0) if need_ub else _empty(g),
        d_scale if need_scale else _empty(g),
    )


class _TorchBackend:
    name = "torch"
    ops = frozenset({"lora", "series"})
    stores_mask = True

    @staticmethod
    def available() -> str | None:
        return None

    @staticmethod
    def supports_device(device: torch.device) -> str | None:
        return None

    keep_mask = staticmethod(keep_mask)
    lora_forward = staticmethod(lora_forward)
    lora_backward = staticmethod(lora_backward)
    series_forward = staticmethod(series_forward)
    series_backward = staticmethod(series_backward)


BACKEND = _TorchBackend()
