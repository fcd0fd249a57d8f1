"""Schemas and fake (meta) implementations of the CUDA extension's low-level ops.

The schemas live here, once; csrc/ops.cpp only supplies kernels for them
(`TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA / CPU, m)`). `define()` must run before the
extension's library is loaded, which `cuda_backend` does. The fakes give each op its output
shapes without running it, so `torch.library.opcheck` and tracing (FakeTensor) work on the
low-level ops too, not only on the backend-level custom ops built around them.

Shapes: x [M, K] (float16 / bfloat16 / float32), rank-sized operands float32.
"""

from __future__ import annotations

import threading

import torch

NAMESPACE = "llm_adapters_C"

SCHEMAS = {
    # S = D(x) wᵀ · out_scale (+ bias): x [M, K], w [r, K] f32 -> [M, r] f32;
    # tensor_cores: 16-bit x on the tensor cores (sm_80+), else the CUDA-core kernel
    "shrink": "(Tensor x, Tensor w, Tensor? bias, int threshold, float out_scale, int seed, "
              "bool tensor_cores=True) -> Tensor",
    # out = input (or out) + keep · scaling · scale · φ(h) wᵀ + bias: h [M, r] f32, w [N, r] f32;
    # tensor_cores: φ(h) wᵀ on the tensor cores for 16-bit out (sm_80+), as shrink's;
    # col_scale [N] f32 (DoRA): out = col_scale ⊙ (input + ...) + bias, one rounding, and the
    # sum T = input + ... into t_out (out's dtype and shape) when given
    "expand_add_": "(Tensor(a!) out, Tensor? input, Tensor h, int act, Tensor w, Tensor? bias, "
                   "Tensor? scale, float scaling, int threshold, int seed, "
                   "bool tensor_cores=True, Tensor? col_scale=None, Tensor(b!)? t_out=None) "
                   "-> ()",
    # Σ_m D(x)[m, n] φ(h[m, j]): x [M, N], h [M, r] f32 -> [N, r] f32; tensor_cores as shrink's
    "reduce_rows": "(Tensor x, Tensor h, int act, int threshold, int seed, "
                   "bool tensor_cores=True) -> Tensor",
    # fused series forward, one block per 64 rows: (z [M, N], s_pre [M, r] f32);
    # down_t, up: [N, r] f32; tensor_cores: both products of 16-bit h on the tensor cores
    "series_forward": "(Tensor h, Tensor down_t, Tensor up, Tensor? down_bias, "
                      "Tensor? up_bias, Tensor? scale, float scaling, int act, int threshold, "
                      "float out_scale, int seed, bool tensor_cores=True) -> (Tensor, Tensor)",
    # one pass over g [M, N] with w [N, r]: (dS [M, r], d_w = s·gᵀφ(s_pre) [N, r] or empty,
    # the row terms of d(scale) [M] or empty, dh = g + D'(dS dh_wᵀ) [M, N] or empty);
    # tensor_cores: g·w and the d_w partials of 16-bit g on the tensor cores, as shrink's
    "grad_rows": "(Tensor g, Tensor w, Tensor s_pre, int act, Tensor? scale, float scaling, "
                 "bool need_dw, bool need_row_terms, Tensor? dh_w, float dh_scaling, "
                 "int threshold, int seed, bool tensor_cores=True) "
                 "-> (Tensor, Tensor, Tensor, Tensor)",
    # out (bool, row-major) = the dropout keep-mask for its linear indices
    "keep_mask_": "(Tensor(a!) out, int threshold, int seed) -> ()",
}

_lock = threading.Lock()
_library: torch.library.Library | None = None  # kept alive: dropping it would drop the schemas


def _f32(t: torch.Tensor, *shape: int) -> torch.Tensor:
    return t.new_empty(shape, dtype=torch.float32)


def _fake_shrink(x, w, bias, threshold, out_scale, seed, tensor_cores=True):
    return _f32(x, x.shape[0], w.shape[0])


def _fake_expand_add_(out, input, h, act, w, bias, scale, scaling, threshold, seed,
                      tensor_cores=True, col_scale=None, t_out=None):
    return None


def _fake_reduce_rows(x, h, act, threshold, seed, tensor_cores=True):
    return _f32(x, x.shape[1], h.shape[1])


def _fake_series_forward(h, down_t, up, down_bias, up_bias, scale, scaling, act, threshold,
                         out_scale, seed, tensor_cores=True):
    return torch.empty_like(h), _f32(h, h.shape[0], down_t.shape[1])


def _fake_grad_rows(g, w, s_pre, act, scale, scaling, need_dw, need_row_terms, dh_w,
                    dh_scaling, threshold, seed, tensor_cores=True):
    m, n = g.shape
    r = w.shape[1]
    return (
        _f32(g, m, r),
        _f32(g, n, r) if need_dw else _f32(g, 0),
        _f32(g, m) if need_row_terms else _f32(g, 0),
        g.new_empty((m, n)) if dh_w is not None else g.new_empty((0,)),
    )


def _fake_keep_mask_(out, threshold, seed):
    return None


_FAKES = {
    "shrink": _fake_shrink,
    "expand_add_": _fake_expand_add_,
    "reduce_rows": _fake_reduce_rows,
    "series_forward": _fake_series_forward,
    "grad_rows": _fake_grad_rows,
    "keep_mask_": _fake_keep_mask_,
}


def define() -> None:
    """Define the ops' schemas and fakes in this process (once; before the library loads)."""
    global _library
    with _lock:
        if _library is not None:
            return
        library = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            library.define(name + schema)
            torch.library.register_fake(f"{NAMESPACE}::{name}", _FAKES[name], lib=library)
        _library = library
