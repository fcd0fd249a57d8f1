"""The autograd wrappers around each backend: a `torch.library` custom op pair per backend and
op for torch.compile, and a plain autograd.Function with the same formulas for eager mode.

`custom_op` + `register_fake` + `register_autograd` makes each backend opaque to
`torch.compile` (no graph breaks, traced by shape) and checkable by `torch.library.opcheck`.
Its Python dispatch costs about 0.3 ms a forward+backward on a CPU, which at small M would eat
what fusion gains, so eager calls go through `eager_lora` / `eager_series` instead: the same
setup and backward code, called directly. The ops are created when a backend is first
loaded, so importing the package never imports Triton or loads the CUDA extension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

from .._numerics import acc_dtype

_ops: dict[tuple[str, str], Callable[..., Any]] = {}


def _fake_grads(g: Tensor, shapes: list[tuple[int, ...]], needs: list[bool], first_dtype):
    acc = acc_dtype(g.dtype)
    out = []
    for i, (shape, need) in enumerate(zip(shapes, needs)):
        dtype = first_dtype if i == 0 else acc
        out.append(g.new_empty(shape if need else (0,), dtype=dtype))
    return tuple(out)


def _cast_grads(grads, needs, refs):
    out = []
    for g, need, ref in zip(grads, needs, refs):
        if not need or ref is None:
            out.append(None)
            continue
        dtype, shape = ref
        if g.dtype != dtype:
            g = g.to(dtype)
        out.append(g if g.shape == shape else g.reshape(shape))
    return out


def _lora_setup(ctx, inputs, output) -> None:
    x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation = inputs[:12]
    _, s_pre, mask = output
    ctx.save_for_backward(x, weight, a, b, scale_t, seed, s_pre, mask)
    refs = (x, bias, a, b, a_bias, b_bias, scale_t)
    ctx.refs = tuple(None if t is None else (t.dtype, t.shape) for t in refs)
    ctx.args = (scaling, p, activation)


def _lora_grads(ctx, gy, bwd) -> tuple:
    """Gradients for the 12 op inputs; `bwd` is the backend's backward (op or function)."""
    x, weight, a, b, scale_t, seed, s_pre, mask = ctx.saved_tensors
    ni = ctx.needs_input_grad
    needs = [bool(ni[i]) for i in (0, 2, 3, 4, 5, 6, 7)]
    scaling, p, activation = ctx.args
    grads = bwd(
        gy.contiguous(), x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask,
        needs,
    )
    dx, dbias, da, db, dab, dbb, dscale = _cast_grads(grads, needs, ctx.refs)
    return dx, None, dbias, da, db, dab, dbb, dscale, None, None, None, None


def _series_setup(ctx, inputs, output) -> None:
    h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation = inputs[:10]
    _, s_pre, mask = output
    ctx.save_for_backward(h, down, up, scale_t, seed, s_pre, mask)
    refs = (h, down, up, down_bias, up_bias, scale_t)
    ctx.refs = tuple(None if t is None else (t.dtype, t.shape) for t in refs)
    ctx.args = (scaling, p, activation)


def _series_grads(ctx, gz, bwd) -> tuple:
    """Gradients for the 10 op inputs."""
    h, down, up, scale_t, seed, s_pre, mask = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    scaling, p, activation = ctx.args
    grads = bwd(
        gz.contiguous(), h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs
    )
    return (*_cast_grads(grads, needs, ctx.refs), None, None, None, None)


def _seeded(fn, at: int):
    """A backend backward taking the seed (argument `at`) as a tensor, as the custom op does."""
    return lambda *args: fn(*args[:at], int(args[at]), *args[at + 1:])


class _EagerLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        *args, backend = inputs
        seed = args[10]
        output = backend.lora_forward(*args[:10], int(seed), args[11])
        _lora_setup(ctx, args, output)
        ctx.backend = backend
        return output[0]

    @staticmethod
    def backward(ctx, gy):
        return (*_lora_grads(ctx, gy, _seeded(ctx.backend.lora_backward, 8)), None)


class _EagerSeries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        *args, backend = inputs
        output = backend.series_forward(*args[:8], int(args[8]), args[9])
        _series_setup(ctx, args, output)
        ctx.backend = backend
        return output[0]

    @staticmethod
    def backward(ctx, gz):
        return (*_series_grads(ctx, gz, _seeded(ctx.backend.series_backward, 7)), None)


def eager_lora(backend: Any, *args: Any) -> Tensor:
    """lora_linear on `backend` without the custom-op dispatch (eager mode only)."""
    return _EagerLora.apply(*args, backend)


def eager_series(backend: Any, *args: Any) -> Tensor:
    """series_adapter on `backend` without the custom-op dispatch (eager mode only)."""
    return _EagerSeries.apply(*args, backend)


def lora_op(backend: Any) -> Callable[..., Tensor]:
    """The autograd-aware custom op running `backend`'s LoRA / parallel-adapter kernels."""
    key = (backend.name, "lora")
    if key in _ops:
        return _ops[key]
    prefix = f"llm_adapters::lora_linear_{backend.name}"

    @torch.library.custom_op(prefix, mutates_args=())
    def fwd(
        x: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        a: Tensor,
        b: Tensor,
        a_bias: Optional[Tensor],
        b_bias: Optional[Tensor],
        scale_t: Optional[Tensor],
        scaling: float,
        dropout_p: float,
        seed: Tensor,
        activation: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return backend.lora_forward(
            x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, dropout_p,
            int(seed), activation,
        )

    @fwd.register_fake
    def _(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, dropout_p, seed, activation):
        m, k = x.shape
        mask_shape = (m, k) if (backend.stores_mask and dropout_p > 0) else (0,)
        return (
            x.new_empty((m, weight.shape[0])),
            x.new_empty((m, a.shape[0]), dtype=acc_dtype(x.dtype)),
            x.new_empty(mask_shape, dtype=torch.bool),
        )

    @torch.library.custom_op(prefix + "_backward", mutates_args=())
    def bwd(
        g: Tensor,
        x: Tensor,
        weight: Tensor,
        a: Tensor,
        b: Tensor,
        scale_t: Optional[Tensor],
        scaling: float,
        dropout_p: float,
        seed: Tensor,
        activation: str,
        s_pre: Tensor,
        mask: Tensor,
        needs: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return backend.lora_backward(
            g, x, weight, a, b, scale_t, scaling, dropout_p, int(seed), activation,
            s_pre, mask, needs,
        )

    @bwd.register_fake
    def _(g, x, weight, a, b, scale_t, scaling, dropout_p, seed, activation, s_pre, mask, needs):
        m, k = x.shape
        n, r = b.shape
        shapes = [(m, k), (n,), (r, k), (n, r), (r,), (n,), ()]
        return _fake_grads(g, shapes, needs, g.dtype)

    def setup_context(ctx, inputs, output):
        _lora_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, gy, _gs, _gm):
        return _lora_grads(ctx, gy, bwd)

    fwd.register_autograd(backward, setup_context=setup_context)
    _ops[key] = fwd
    return fwd


def series_op(backend: Any) -> Callable[..., Tensor]:
    """The autograd-aware custom op running `backend`'s series bottleneck adapter kernels."""
    key = (backend.name, "series")
    if key in _ops:
        return _ops[key]
    prefix = f"llm_adapters::series_adapter_{backend.name}"

    @torch.library.custom_op(prefix, mutates_args=())
    def fwd(
        h: Tensor,
        down: Tensor,
        up: Tensor,
        down_bias: Optional[Tensor],
        up_bias: Optional[Tensor],
        scale_t: Optional[Tensor],
        scaling: float,
        dropout_p: float,
        seed: Tensor,
        activation: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return backend.series_forward(
            h, down, up, down_bias, up_bias, scale_t, scaling, dropout_p, int(seed), activation
        )

    @fwd.register_fake
    def _(h, down, up, down_bias, up_bias, scale_t, scaling, dropout_p, seed, activation):
        m, n = h.shape
        mask_shape = (m, n) if (backend.stores_mask and dropout_p > 0) else (0,)
        return (
            h.new_empty((m, n)),
            h.new_empty((m, down.shape[0]), dtype=acc_dtype(h.dtype)),
            h.new_empty(mask_shape, dtype=torch.bool),
        )

    @torch.library.custom_op(prefix + "_backward", mutates_args=())
    def bwd(
        g: Tensor,
        h: Tensor,
        down: Tensor,
        up: Tensor,
        scale_t: Optional[Tensor],
        scaling: float,
        dropout_p: float,
        seed: Tensor,
        activation: str,
        s_pre: Tensor,
        mask: Tensor,
        needs: list[bool],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return backend.series_backward(
            g, h, down, up, scale_t, scaling, dropout_p, int(seed), activation, s_pre, mask,
            needs,
        )

    @bwd.register_fake
    def _(g, h, down, up, scale_t, scaling, dropout_p, seed, activation, s_pre, mask, needs):
        m, n = h.shape
        r = down.shape[0]
        shapes = [(m, n), (r, n), (n, r), (r,), (n,), ()]
        return _fake_grads(g, shapes, needs, g.dtype)

    def setup_context(ctx, inputs, output):
        _series_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1], output[2])

    def backward(ctx, gz, _gs, _gm):
        return _series_grads(ctx, gz, bwd)

    fwd.register_autograd(backward, setup_context=setup_context)
    _ops[key] = fwd
    return fwd
