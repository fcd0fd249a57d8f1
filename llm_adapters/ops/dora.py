"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as PEFT 0.21 computes it, as one fused op.

For a Linear with weight W [N, K], LoRA A [r, K], B [N, r], scaling s and magnitude m [N]:

    wn = ‖W + s·B A‖ per output row, detached (no gradient through the norm, as in PEFT and
         §4.3 of the paper)
    c  = m / wn
    p = 0:  y = c ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + b
    p > 0:  y = x Wᵀ + b + (c − 1) ⊙ (D(x) Wᵀ) + c ⊙ s·(D(x) Aᵀ) Bᵀ

(PEFT with dropout active hands its DoRA layer the dropped input and no base result, so the
(c − 1) term multiplies D(x) Wᵀ; with dropout inactive it multiplies the base output less its
bias, which is the p = 0 line.)

W + s·B A is never formed. Its row norms come from
    ‖W_n + s(BA)_n‖² = ‖W_n‖² + 2s·(W Aᵀ)_n·B_n + s²·B_n (A Aᵀ) B_nᵀ
with ‖W_n‖² of the frozen base passed in (the layer caches it; `weight_row_norm_sq`), so a
forward reads W once more only for the skinny W Aᵀ [N, r].

The op ("dora" in ops/_custom.py; its backends' `dora_forward` / `dora_backward`) computes
    T = x Wᵀ + s·(D(x) Aᵀ) Bᵀ   (the fp32 accumulator of the base GEMM and the rank-r update)
    y = c ⊙ T + b               (the GEMM's epilogue: the column scale before the bias, one
                                 rounding; T itself is stored only when c needs a gradient)
with backward gc = c ⊙ g, dx = gc W + s·D'((gc B) A), dA, dB as LoRA's with gc for g,
db = Σ_rows g and dc = Σ_rows g ⊙ T; autograd takes dc on to dm = dc / wn. Under dropout
PEFT's line differs from the op's by (c − 1) ⊙ E with E = (D(x) − x) Wᵀ, added after the op
with D(x) from the same backend's keep-mask for the seed.

`dora_add` is the same on a quantized base whose own product y0 the caller computed (PEFT's
QDoRA): the op "dora_add" takes T = (y0 − b) + s·(D(x) Aᵀ) Bᵀ, gives dy0 = c ⊙ g, and the
dequantized weight gives the norms and, under dropout, E = D(x) Wᵀ − (y0 − b).
"""

from __future__ import annotations

import sys
from typing import Optional, Union

import torch
from torch import Tensor

from .._numerics import acc_dtype, dropout_threshold

# The package itself: this module is imported while llm_adapters.ops initialises, so its
# functions (lora_linear, the dispatch) are looked up on it at call time.
_ops = sys.modules[__name__.rpartition(".")[0]]

def weight_row_norm_sq(weight: Tensor) -> Tensor:
    """‖W_n‖² per output row of a base weight [N, K] (a transposed view is fine), in float32
    (float64 for a float64 weight), without a float32 copy of W."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=acc).square()


def dora_weight_norm(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    weight_norm_sq: Optional[Tensor] = None,
) -> Tensor:
    """wn = ‖W + s·B A‖ per output row [N] (float32, or float64 for float64 weights), detached,
    from ‖W_n‖² (`weight_norm_sq`, computed here when None) and rank-sized products only."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        w = weight.detach()
        a = lora_a.detach()
        b = lora_b.detach().to(acc)
        wsq = weight_row_norm_sq(w) if weight_norm_sq is None else weight_norm_sq.to(acc)
        wa = torch.mm(w, a.to(w.dtype).t()).to(acc)  # [N, r]: the one extra read of W
        a = a.to(acc)
        cross = (wa * b).sum(1)
        quad = (torch.mm(b, torch.mm(a, a.t())) * b).sum(1)
        s = float(scaling)
        # cancellation can take a (near-)zero norm a rounding below zero
        return (wsq + (2.0 * s) * cross + (s * s) * quad).clamp_min_(0.0).sqrt_()


class _DroppedProduct(torch.autograd.Function):
    """(x ⊙ f(mk)) Wᵀ for the backend's keep-mask mk of a dropout seed, f(kept) = `on`,
    f(dropped) = `off`: E = (D(x) − x) Wᵀ with (on, off) = (1/keep − 1, −1), P = D(x) Wᵀ with
    (1/keep, 0). Saves no mask: backward draws it again from the seed (as the kernels do), so
    training holds only W (the frozen base weight, or a quantized base's dequantized one, by
    reference) and the seed."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, seed: Tensor, on: float, off: float,
                mask_args: tuple) -> Tensor:
        ctx.save_for_backward(weight, seed)
        ctx.on, ctx.off, ctx.mask_args = on, off, mask_args
        keep = _keep_mask(*mask_args, x, seed)
        return torch.where(keep, x * on, x * off if off else 0.0) @ weight.t()

    @staticmethod
    def backward(ctx, ge: Tensor):
        weight, seed = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            gw = ge @ weight  # [M, K]: x's shape, dtype and device, so the same mask
            keep = _keep_mask(*ctx.mask_args, gw, seed)
            dx = torch.where(keep, gw * ctx.on, gw * ctx.off if ctx.off else 0.0)
        return dx, None, None, None, None, None


def _check_dora(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, weight_norm_sq,
                bias_dtype=True) -> tuple[int, int, int]:
    """The checks dora_linear and dora_add share; returns (n, k, r)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension, got a 0-dim tensor")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be 2-D [N, K], got {got}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, but weight is [N={n}, K={k}]")
    if not isinstance(lora_a, Tensor) or lora_a.dim() != 2 or lora_a.shape[0] < 1:
        got = tuple(lora_a.shape) if isinstance(lora_a, Tensor) else type(lora_a).__name__
        raise ValueError(f"lora_a must be 2-D [r, {k}] with r >= 1, got {got}")
    r = lora_a.shape[0]
    if isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)) or isinstance(
            scaling, bool):
        raise TypeError(f"DoRA scaling must be a float (alpha / r), got {scaling!r}")
    _ops._check_common(x, "x", r, dropout_p, "identity", float(scaling))
    _ops._check_tensor("weight", weight, (n, k), x.device)
    _ops._check_tensor("lora_a", lora_a, (r, k), x.device)
    _ops._check_tensor("lora_b", lora_b, (n, r), x.device)
    _ops._check_tensor("magnitude", magnitude, (n,), x.device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if bias is not None:
        _ops._check_tensor("bias", bias, (n,), x.device)
        if bias_dtype and bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
    if weight_norm_sq is not None:
        _ops._check_tensor("weight_norm_sq", weight_norm_sq, (n,), x.device)
    return n, k, r


@torch.library.custom_op("llm_adapters::dora_keep_mask", mutates_args=())
def _traced_keep_mask(x2: Tensor, p: float, seed: Tensor, backend: str) -> Tensor:
    """The keep-mask as an op torch.compile can trace (a backend's mask draws from a generator
    or launches a kernel, which the tracer cannot follow)."""
    return _ops.loaded_backend(backend).keep_mask(tuple(x2.shape), p, int(seed), x2.device)


@_traced_keep_mask.register_fake
def _(x2, p, seed, backend):
    return x2.new_empty(x2.shape, dtype=torch.bool)


def _keep_mask(op: str, backend: Optional[str], n: int, r: int, p: float, x2: Tensor,
               seed: Tensor) -> Tensor:
    """The keep-mask of the backend `op` ran on, for this seed and shape."""
    impl = _ops._op(op, x2, backend, n, r, p).backend
    if torch.compiler.is_compiling():
        return _traced_keep_mask(x2.detach(), p, seed, impl.name)
    return impl.keep_mask(tuple(x2.shape), p, int(seed), x2.device)


def _run(op: str, x2: Tensor, backend: Optional[str], n: int, r: int, p: float, args) -> Tensor:
    bound = _ops._op(op, x2, backend, n, r, p)
    return bound.custom(*args)[0] if torch.compiler.is_compiling() else bound.eager(*args)


def _col_scale(magnitude: Tensor, wn: Tensor) -> tuple[Tensor, bool]:
    """c = m / wn in the accumulation dtype (differentiable in m), and whether the op must keep
    T for dc."""
    c = magnitude.to(wn.dtype) / wn
    return c, bool(c.requires_grad and torch.is_grad_enabled())


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: Union[int, Tensor, None] = None,
    backend: Optional[str] = None,
    weight_norm_sq: Optional[Tensor] = None,
) -> Tensor:
    """DoRA: y = c ⊙ (x Wᵀ + s·B A x) + b with c = m / ‖W + s·B A‖_row (p = 0), and PEFT's
    y = x Wᵀ + b + (c − 1) ⊙ D(x) Wᵀ + c ⊙ s·B A D(x) under dropout (see the module docstring).

    x: [..., K]; weight: [N, K] frozen (a transposed view is fine); bias: [N] or None;
    lora_a: [r, K]; lora_b: [N, r]; magnitude: [N] (any float dtype; its gradient comes back
    in it); scaling: a float; seed: the dropout seed (drawn from torch's CPU generator when
    None); backend: as in `lora_linear`; weight_norm_sq: ‖W_n‖² [N] of this weight
    (`weight_row_norm_sq`), computed here when None. The norm is detached, as in PEFT: no
    gradient flows through it. Returns [..., N] in x's dtype.
    """
    n, k, r = _check_dora(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p,
                          weight_norm_sq)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "the base weight must be frozen (requires_grad=False): dora_linear computes no "
            "gradient for it"
        )
    p = float(dropout_p)
    seed_t = _ops._seed_tensor(seed, p)
    x2 = _ops._rows(x, k)
    wn = dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq)
    c, save_t = _col_scale(magnitude, wn)
    y = _run("dora", x2, backend, n, r, p,
             (x2, weight, bias, lora_a, lora_b, c, float(scaling), p, seed_t, save_t))
    if p > 0:
        inv_keep = dropout_threshold(p)[1]
        e = _DroppedProduct.apply(x2, weight, seed_t, inv_keep - 1.0, -1.0,
                                  ("dora", backend, n, r, p))
        y = torch.addcmul(y, c - 1.0, e).to(x.dtype)
    return y.view(*x.shape[:-1], n)


def dora_add(
    y0: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scaling: float = 1.0,
    dropout_p: float = 0.0,
    seed: Union[int, Tensor, None] = None,
    backend: Optional[str] = None,
    weight_norm_sq: Optional[Tensor] = None,
) -> Tensor:
    """DoRA on a base whose product y0 = base(x) [..., N] (bias included) the caller computed —
    a quantized layer's own — with `weight` [N, K] its dequantized float weight, as PEFT runs
    DoRA on bitsandbytes / torchao bases:
        p = 0:  y = y0 + (c − 1) ⊙ (y0 − b) + c ⊙ s·B A x = c ⊙ (y0 − b + s·B A x) + b
        p > 0:  y = y0 + (c − 1) ⊙ D(x) Wᵀ + c ⊙ s·B A D(x)
    computed by the op "dora_add" on y0 − b, plus (c − 1) ⊙ (D(x) Wᵀ − (y0 − b)) under dropout;
    dy0 = c ⊙ g (p = 0) or g (p > 0), and autograd runs the base layer's own backward from it.
    y0 may hold more than the base product (earlier adapters' updates: PEFT hands a further
    DoRA adapter the output so far as its base result, and so does `LoraLinear`). `weight` is
    read for the row norms and, under dropout, for D(x) Wᵀ (held for backward); bias is the
    base layer's (any float dtype). Other arguments as in `dora_linear`.
    """
    n, k, r = _check_dora(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p,
                          weight_norm_sq, bias_dtype=False)
    if not isinstance(y0, Tensor) or tuple(y0.shape) != (*x.shape[:-1], n):
        got = tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__
        raise ValueError(f"y0 has shape {got}, expected {(*x.shape[:-1], n)}")
    if y0.dtype != x.dtype:
        raise TypeError(f"y0 dtype {y0.dtype} does not match x dtype {x.dtype}")
    if y0.device != x.device:
        raise ValueError(f"y0 is on {y0.device}, but the input is on {x.device}")
    p = float(dropout_p)
    seed_t = _ops._seed_tensor(seed, p)
    x2, y2 = _ops._rows(x, k), _ops._rows(y0, n)
    epilogue_bias = None if bias is None else bias.to(x.dtype)
    unbiased = y2 if bias is None else y2 - epilogue_bias
    wn = dora_weight_norm(weight, lora_a, lora_b, scaling, weight_norm_sq)
    c, save_t = _col_scale(magnitude, wn)
    y = _run("dora_add", x2, backend, n, r, p,
             (x2, unbiased, lora_a, lora_b, epilogue_bias, c, float(scaling), p, seed_t, save_t))
    if p > 0:
        e = _DroppedProduct.apply(x2, weight.detach(), seed_t, dropout_threshold(p)[1], 0.0,
                                  ("dora_add", backend, n, r, p)) - unbiased
        y = torch.addcmul(y, c - 1.0, e).to(x.dtype)
    return y.view(*x.shape[:-1], n)
