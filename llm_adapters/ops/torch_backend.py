"""The `torch` backend: plain PyTorch in the fused order. The CPU path and the reference.

It implements the backend contract of `ops/_backend.py` (the four functions on 2-D, validated
inputs). Its forwards also take an optional `mask=`: another backend's keep-mask to use
instead of this one's draw, which is how the GPU backends run float64 in PyTorch with their
own Philox mask.

Memory traffic (LoRA forward, M tokens): the base GEMM reads x and W and writes y once;
the branch reads x once more for the shrink and adds a rank-r product into y in place
(addmm_, no separate [M, N] branch output). With dropout the masked x is a temporary for the
shrink GEMM only; what is kept for backward is the bool keep-mask (1 byte an element), never a
masked copy of x. PEFT keeps a float copy of the dropped x and a mask.

Dropout on this backend: drawing random numbers is what costs on a CPU. One 64-bit draw gives
four 16-bit lanes; an element is kept when its lane is >= round(p * 65536). So p is realised
to 1/65536 and the inverted-dropout scale uses the realised keep probability, keeping the
estimator unbiased. The mask for a seed is `keep_mask(shape, p, seed, device)`.

Activations: the fused ones (`_numerics.ACTIVATIONS`) run through the hand-written backwards
below; every other name of transformers' ACT2FN through `lora_composite` / `lora_add_composite`
/ `series_composite`, the same ops in plain PyTorch autograd with transformers' module as φ.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import DROPOUT_LANES as _LANES
from .._numerics import acc_dtype, activation_grad, apply_activation, dropout_threshold

__all__ = ["BACKEND", "acc_dtype", "dropout_threshold", "keep_mask"]


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



def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    # .to() costs about a microsecond even when it does nothing; these ops are called per
    # layer per step, and at small M that overhead is what decides against eager PyTorch
    return t if t.dtype == dtype else t.to(dtype)


def _empty(ref: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return ref.new_empty(0, dtype=dtype or acc_dtype(ref.dtype))


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    # torch.where is about 8x cheaper on CPU than x * mask (no bool -> float promotion pass).
    return torch.where(mask, x, 0.0)


# Parallel regions. On a CPU every ATen op above ~32k elements (and every GEMM) is one OpenMP
# parallel region over all intra-op threads, ended by a barrier. While other processes hold the
# cores, a region lasts until its last thread is scheduled again, a scheduler time slice (tens
# of ms on a busy 2-core machine) however little work it has, so under load a call costs about
# its number of regions, not its FLOPs (benchmarks/contention.py). Hence scales go into GEMM
# alphas, biases into GEMM betas and activation derivatives into ATen's fused *_backward ops:
# a series fwd+bwd (tanh, float scale) opens 15 regions, 12 of them in its six GEMMs (eager
# PyTorch: 18; this backend before: 20). Counted by benchmarks/contention.py --regions.


def _mm(a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha · a b in one GEMM: the scale rides in the GEMM's alpha, not in an extra pass."""
    if alpha == 1.0:
        return a @ b
    # beta = 0: the 0-dim input is neither read nor copied into the result
    return torch.addmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)


def _shrink(x: Tensor, a: Tensor, a_bias: Tensor | None, p: float, seed: int,
            mask: Tensor | None = None):
    """S = D(x) aᵀ + a_bias in float32, and the keep-mask (empty when p == 0). `mask`, when
    given, is used instead of this backend's own draw (another backend's keep-mask)."""
    a_ = _as(a, x.dtype)
    acc = acc_dtype(x.dtype)
    inv_keep = 1.0
    if p > 0.0:
        if mask is None:
            mask = keep_mask(tuple(x.shape), p, seed, x.device)
        _, inv_keep = dropout_threshold(p)
        x = _masked(x, mask)  # scale the rank-sized result, not x
    else:
        mask = x.new_empty(0, dtype=torch.bool)
    if x.dtype == acc:  # float32 / float64: bias, scale and product in one GEMM
        if a_bias is not None:
            return torch.addmm(_as(a_bias, acc), x, a_.t(), alpha=inv_keep), mask
        return _mm(x, a_.t(), inv_keep), mask
    # half precision: the GEMM rounds to x.dtype; scale and bias are applied in float32 after
    s = _as(x @ a_.t(), acc)
    if inv_keep != 1.0:
        s = s.mul_(inv_keep)
    if a_bias is not None:
        s = s.add_(_as(a_bias, s.dtype))
    return s, mask


def _dropped_t_matmul(ds: Tensor, x: Tensor, mask: Tensor, p: float) -> Tensor:
    """dSᵀ D(x): the gradient of the down/A projection, [r, K]."""
    if p > 0.0:
        _, inv_keep = dropout_threshold(p)
        if ds.dtype != acc_dtype(ds.dtype):  # half precision: scale after the rounded GEMM
            return (ds.t() @ _masked(x, mask)).mul_(inv_keep)
        return _mm(ds.t(), _masked(x, mask), inv_keep)
    return ds.t() @ x


def _add_dropped(out: Tensor, ds: Tensor, a: Tensor, mask: Tensor, p: float, inplace: bool):
    """out + D'(dS a); in place into `out` when `inplace`."""
    if p > 0.0:
        _, inv_keep = dropout_threshold(p)
        t = _masked(ds @ a, mask)
        return out.add_(t, alpha=inv_keep) if inplace else torch.add(out, t, alpha=inv_keep)
    return out.addmm_(ds, a) if inplace else torch.addmm(out, ds, a)


def _act_backward(gu: Tensor, s_pre: Tensor, h_act: Tensor, activation: str) -> Tensor:
    """gu ⊙ φ'(S) in one fused ATen pass where ATen has one (tanh, relu, gelu, silu): the same
    formulas as `activation_grad`, without its two to four separate elementwise passes."""
    if activation == "identity":
        return gu
    if activation == "tanh":  # gu (1 - φ(S)²)
        return torch.ops.aten.tanh_backward(gu, h_act)
    if activation == "relu":  # gu where S > 0, else 0
        return torch.ops.aten.threshold_backward(gu, s_pre, 0.0)
    if activation == "gelu":  # exact (erf) GELU, as apply_activation
        return torch.ops.aten.gelu_backward(gu, s_pre)
    if activation == "silu":
        return torch.ops.aten.silu_backward(gu, s_pre)
    return gu.mul_(activation_grad(s_pre, activation))


def _branch_grads(g, h_act, s_pre, up, scale_t, scaling, activation, need_up, need_scale):
    """From g: d(up) = s gᵀ φ(S), dS = s (g up) ⊙ φ'(S), d(scale) = Σ (g up) ⊙ φ(S).

    In float32 / float64 a float s rides in the GEMMs' alpha; d(scale) is one dot product.
    """
    dt, acc = g.dtype, acc_dtype(g.dtype)
    up_ = _as(up, dt)
    if scale_t is None and not need_scale and dt == acc:
        # float32 / float64 (half precision keeps the scale out of its rounded GEMMs)
        gu = _mm(g, up_, scaling)  # s (g up), [M, r]
        d_up = _mm(g.t(), h_act, scaling) if need_up else None
        return _act_backward(gu, s_pre, h_act, activation), d_up, None
    s = scaling if scale_t is None else _as(scale_t, acc)
    gu = _as(g @ up_, acc)
    d_up = _as(g.t() @ _as(h_act, dt), acc).mul_(s) if need_up else None
    d_scale = torch.dot(gu.reshape(-1), h_act.reshape(-1)) if need_scale else None
    return _act_backward(gu.mul_(s), s_pre, h_act, activation), d_up, d_scale


def lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation,
                 mask=None):
    s_pre, mask = _shrink(x, a, a_bias, p, seed, mask)
    h_act = _as(apply_activation(s_pre, activation), x.dtype)
    if b_bias is not None:  # b_bias is not scaled: fold it into the base bias (N-sized)
        bias = _as(b_bias, x.dtype) if bias is None else bias + _as(b_bias, x.dtype)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    if scale_t is None:
        y.addmm_(h_act, _as(b, x.dtype).t(), alpha=scaling)
    else:
        y.addmm_(h_act * _as(scale_t, x.dtype), _as(b, x.dtype).t())
    return y, s_pre, mask


def lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    need_dx, need_bias, need_a, need_b, need_ab, need_bb, need_scale = needs
    h_act = apply_activation(s_pre, activation)
    ds, d_b, d_scale = _branch_grads(
        g, h_act, s_pre, b, scale_t, scaling, activation, need_b, need_scale
    )
    dt = g.dtype
    ds_ = _as(ds, dt)
    dx = _empty(g, g.dtype)
    if need_dx:
        dx = _add_dropped(g @ weight, ds_, _as(a, dt), mask, p, inplace=True)
    d_a = _as(_dropped_t_matmul(ds_, x, mask, p), ds.dtype) if need_a else _empty(g)
    g_sum = g.sum(0, dtype=ds.dtype) if (need_bias or need_bb) else None
    return (
        dx,
        g_sum.clone() if need_bias else _empty(g),
        d_a,
        d_b if need_b else _empty(g),
        ds.sum(0) if need_ab else _empty(g),
        g_sum if need_bb else _empty(g),
        d_scale if need_scale else _empty(g),
    )


def lora_add_forward(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation,
                     mask=None):
    """y0 + s·φ(D(x) aᵀ + a_bias) bᵀ + b_bias: the branch of `lora_forward` added into a base
    output computed elsewhere (a quantized layer's own product). One GEMM with beta = 1 reads
    y0 and writes y: no [M, N] branch output, no separate pass over y."""
    s_pre, mask = _shrink(x, a, a_bias, p, seed, mask)
    h_act = _as(apply_activation(s_pre, activation), x.dtype)
    b_ = _as(b, x.dtype).t()
    if scale_t is None:
        y = torch.addmm(y0, h_act, b_, alpha=scaling)
    else:
        y = torch.addmm(y0, h_act * _as(scale_t, x.dtype), b_)
    if b_bias is not None:
        y.add_(_as(b_bias, x.dtype))
    return y, s_pre, mask


def lora_add_backward(g, x, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The branch's gradients; dx is its term D'(dS a) only (the base layer's own backward
    adds g Wᵀ through autograd), and dy0 = g is handed on by the op wrapper."""
    need_dx, need_a, need_b, need_ab, need_bb, need_scale = needs
    h_act = apply_activation(s_pre, activation)
    ds, d_b, d_scale = _branch_grads(
        g, h_act, s_pre, b, scale_t, scaling, activation, need_b, need_scale
    )
    dt = g.dtype
    ds_ = _as(ds, dt)
    dx = _empty(g, dt)
    if need_dx:
        dx = ds_ @ _as(a, dt)
        if p > 0.0:
            dx = _masked(dx, mask).mul_(dropout_threshold(p)[1])
    d_a = _as(_dropped_t_matmul(ds_, x, mask, p), ds.dtype) if need_a else _empty(g)
    return (
        dx,
        d_a,
        d_b if need_b else _empty(g),
        ds.sum(0) if need_ab else _empty(g),
        g.sum(0, dtype=ds.dtype) if need_bb else _empty(g),
        d_scale if need_scale else _empty(g),
    )


def _column_scale(t: Tensor, col_scale: Tensor, bias: Tensor | None, save_t: bool):
    """(round(c ⊙ T + bias), T or an empty tensor): the DoRA epilogue in the accumulation
    dtype, the column scale before the bias, one rounding, as the kernels' epilogue."""
    y = t * col_scale if bias is None else torch.addcmul(_as(bias, col_scale.dtype), t, col_scale)
    return _as(y, t.dtype), (t if save_t else t.new_empty(0))


def dora_forward(x, weight, bias, a, b, col_scale, scaling, p, seed, save_t, mask=None):
    """y = c ⊙ (x Wᵀ + s·(D(x) aᵀ) bᵀ) + bias (ops/_backend.py); T is the rank-r addmm_
    into the base GEMM's output, as in lora_forward without its bias."""
    s_pre, mask = _shrink(x, a, None, p, seed, mask)
    t = x @ weight.t()
    t.addmm_(_as(s_pre, x.dtype), _as(b, x.dtype).t(), alpha=scaling)
    y, t = _column_scale(t, col_scale, bias, save_t)
    return y, s_pre, mask, t


def dora_add_forward(x, y0, a, b, bias, col_scale, scaling, p, seed, save_t, mask=None):
    """y = c ⊙ (y0 + s·(D(x) aᵀ) bᵀ) + bias for a base output y0 without its bias."""
    s_pre, mask = _shrink(x, a, None, p, seed, mask)
    t = torch.addmm(y0, _as(s_pre, x.dtype), _as(b, x.dtype).t(), alpha=scaling)
    y, t = _column_scale(t, col_scale, bias, save_t)
    return y, s_pre, mask, t


def _dora_grads(g, b, col_scale, scaling, s_pre, t, need_b, need_bias, need_col):
    """gc = c ⊙ g (g's dtype), dS = s·gc b, dB = s·gcᵀ S, dbias = Σ g, dc = Σ g ⊙ T."""
    if need_col and t.dim() != 2:  # an empty [0]: no T kept
        raise RuntimeError("the DoRA column scale needs a gradient, but its forward ran with "
                           "save_t=False and kept no T")
    acc = acc_dtype(g.dtype)
    gc = _as(g * col_scale, g.dtype)
    ds, d_b, _ = _branch_grads(gc, s_pre, s_pre, b, None, scaling, "identity", need_b, False)
    d_bias = g.sum(0, dtype=acc) if need_bias else _empty(g)
    d_col = (_as(g, acc) * t).sum(0) if need_col else _empty(g)
    return gc, ds, d_b if need_b else _empty(g), d_bias, d_col


def dora_backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    need_dx, need_bias, need_a, need_b, need_col = needs
    gc, ds, d_b, d_bias, d_col = _dora_grads(g, b, col_scale, scaling, s_pre, t, need_b,
                                             need_bias, need_col)
    ds_ = _as(ds, g.dtype)
    dx = _empty(g, g.dtype)
    if need_dx:
        dx = _add_dropped(gc @ weight, ds_, _as(a, g.dtype), mask, p, inplace=True)
    d_a = _as(_dropped_t_matmul(ds_, x, mask, p), ds.dtype) if need_a else _empty(g)
    return dx, d_bias, d_a, d_b, d_col


def dora_add_backward(g, x, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    """dx is the branch's term D'(dS a) only; dy0 = c ⊙ g."""
    need_dx, need_y0, need_a, need_b, need_bias, need_col = needs
    gc, ds, d_b, d_bias, d_col = _dora_grads(g, b, col_scale, scaling, s_pre, t, need_b,
                                             need_bias, need_col)
    ds_ = _as(ds, g.dtype)
    dx = _empty(g, g.dtype)
    if need_dx:
        dx = ds_ @ _as(a, g.dtype)
        if p > 0.0:
            dx = _masked(dx, mask).mul_(dropout_threshold(p)[1])
    d_a = _as(_dropped_t_matmul(ds_, x, mask, p), ds.dtype) if need_a else _empty(g)
    return dx, gc if need_y0 else _empty(g, g.dtype), d_a, d_b, d_bias, d_col


def series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation,
                   mask=None):
    s_pre, mask = _shrink(h, down, down_bias, p, seed, mask)
    h_act = _as(apply_activation(s_pre, activation), h.dtype)
    up_ = _as(up, h.dtype)
    if scale_t is None:
        z = torch.addmm(h, h_act, up_.t(), alpha=scaling)
    else:
        z = torch.addmm(h, h_act * _as(scale_t, h.dtype), up_.t())
    if up_bias is not None:
        z.add_(_as(up_bias, h.dtype))
    return z, s_pre, mask


def series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    need_dh, need_down, need_up, need_db, need_ub, need_scale = needs
    h_act = apply_activation(s_pre, activation)
    ds, d_up, d_scale = _branch_grads(
        g, h_act, s_pre, up, scale_t, scaling, activation, need_up, need_scale
    )
    dt = g.dtype
    ds_ = _as(ds, dt)
    dh = _add_dropped(g, ds_, _as(down, dt), mask, p, inplace=False) if need_dh else _empty(g, dt)
    d_down = _as(_dropped_t_matmul(ds_, h, mask, p), ds.dtype) if need_down else _empty(g)
    return (
        dh,
        d_down,
        d_up if need_up else _empty(g),
        ds.sum(0) if need_db else _empty(g),
        g.sum(0, dtype=ds.dtype) if need_ub else _empty(g),
        d_scale if need_scale else _empty(g),
    )


# ---- activations without a fused kernel: plain PyTorch autograd ------------------------------
# Any ACT2FN name other than the fused ones (sigmoid, mish, gelu_new, ...). Each op is written
# in the fused order with differentiable ops, φ is transformers' module and autograd supplies
# every gradient (φ' included); the keep-mask is this backend's draw for the seed, so dropout
# is the same as on the fused path. No custom op: under torch.compile these ops are traced as
# ordinary PyTorch (the mask draw breaks the graph when p > 0).


def _composite_branch(x: Tensor, a: Tensor, a_bias, scale_t, scaling: float, p: float,
                      seed: int, activation: str) -> Tensor:
    """s·φ(D(x) aᵀ + a_bias) in x's dtype, differentiable; S and φ in the accumulation dtype."""
    dt, acc = x.dtype, acc_dtype(x.dtype)
    inv_keep = 1.0
    if p > 0.0:
        mask = keep_mask(tuple(x.shape), p, seed, x.device)
        _, inv_keep = dropout_threshold(p)
        x = _masked(x, mask)
    s = _as(x @ _as(a, dt).t(), acc)
    if inv_keep != 1.0:
        s = s * inv_keep
    if a_bias is not None:
        s = s + _as(a_bias, acc)
    h = _as(apply_activation(s, activation), dt)
    return h * (_as(scale_t, dt) if scale_t is not None else scaling)


def lora_composite(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b with autograd, for any ACT2FN activation."""
    y0 = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return lora_add_composite(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)


def lora_add_composite(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """y = y0 + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b with autograd, for any ACT2FN activation."""
    dt = x.dtype
    branch = _composite_branch(x, a, a_bias, scale_t, scaling, p, seed, activation)
    y = y0 + branch @ _as(b, dt).t()
    return y if b_bias is None else y + _as(b_bias, dt)


def series_composite(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation):
    """z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b with autograd, for any ACT2FN activation."""
    return lora_add_composite(h, h, down, up, down_bias, up_bias, scale_t, scaling, p, seed,
                              activation)


class _TorchBackend:
    name = "torch"
    # runs every ACT2FN activation: the fused ones through the *_forward / *_backward pairs,
    # the others through the *_composite functions (the dispatcher sends those nowhere else)
    any_activation = True
    ops = frozenset({"lora", "series", "lora_add", "dora", "dora_add"})
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
    lora_add_forward = staticmethod(lora_add_forward)
    lora_add_backward = staticmethod(lora_add_backward)
    series_forward = staticmethod(series_forward)
    series_backward = staticmethod(series_backward)
    dora_forward = staticmethod(dora_forward)
    dora_backward = staticmethod(dora_backward)
    dora_add_forward = staticmethod(dora_add_forward)
    dora_add_backward = staticmethod(dora_add_backward)
    lora_composite = staticmethod(lora_composite)
    lora_add_composite = staticmethod(lora_add_composite)
    series_composite = staticmethod(series_composite)


BACKEND = _TorchBackend()
