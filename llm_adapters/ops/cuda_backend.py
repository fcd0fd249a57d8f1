"""The `cuda` backend: hand-written CUDA kernels from `csrc/` (the extension `llm_adapters._C`).

The extension is optional. It is imported when `LLM_ADAPTERS_BUILD_CUDA=1 pip install` built
it; otherwise it is compiled on first use through torch's JIT loader (ninja, nvcc) into a cache
folder (see `llm_adapters/_cuda_build.py`). `extension_status()` says which, or why neither.
Nothing here is imported by the package until `backend="cuda"` (or auto on a GPU) asks for it.

The C++ registers six low-level ops under `torch.ops.llm_adapters_C` (see csrc/ops.cpp):
    shrink          S = D(x) wᵀ·c (+ bias)          one read of x, Philox dropout fused;
                                                    tensor cores for 16-bit x (see below)
    expand_add_     out = in + keep·s·φ(H) wᵀ + bias  in place into the cuBLAS output when in = out;
                    with a column scale c: out = c ⊙ (in + ...) + bias (DoRA), T kept if asked
    reduce_rows     Σ_m D(X)[m, :]ᵀ φ(H)[m, :]        skinny reduction over M (dA, dDn);
                                                    tensor cores for 16-bit X
    series_forward  fused series forward, one block per 64 rows of h (DESIGN §2.2)
    grad_rows       one pass over g: G = g·w, dS, s·gᵀφ(S), the rows of d(scale), and
                    optionally dh = g + D'(dS Dn)
    keep_mask_      the keep-mask itself (also on CPU, for tests)
and this module composes them with the base GEMMs (torch / cuBLAS) into the backend contract
documented in `ops/_backend.py`:

LoRA / parallel forward:  S = shrink(x, A) + a_b;  y = x Wᵀ + b + b_b (cuBLAS);
                          y += s·φ(S) Bᵀ (expand_add_, in place)
LoRA backward:            grad_rows(g, B): dS = s·(g B) ⊙ φ'(S) and dB = s·gᵀφ(S) from the same
                          tiles of g; dx = g W (cuBLAS) += D'(dS A) (expand_add_);
                          dA = reduce_rows(x with the mask, dS)ᵀ / keep
lora_add (y0 given):      S as above; y = y0 + s·φ(S) Bᵀ + b_b (expand_add_ with in = y0, into a
                          new y); backward as LoRA's without g W: dx = 0 (memset) += D'(dS A)
DoRA (dora, dora_add):    as LoRA's / lora_add's forward with the column scale and the bias in
                          the expand's epilogue (one rounding of c ⊙ T + b from float32; T itself
                          stored only when the magnitude needs a gradient); backward: gc = c ⊙ g
                          once (one elementwise pass: cuBLAS's dx = gc W reads it), then LoRA's
                          kernels on gc; dc = Σ g ⊙ T
Series forward:           series_forward: per 64-row block, S = D(h) Dnᵀ + d_b (float32, all
                          rank tiles), then z = h + s·φ(S) Upᵀ + u_b re-reading the block's h
Series backward:          grad_rows(g, Up, dh_w = Dn): dS, dUp and dh = g + D'(dS Dn) in one
                          row-block pass over g;  dDn = reduce_rows(h with the mask, dS)ᵀ / keep
The dropout keep-mask is regenerated from the seed in every kernel that needs it, never
stored; it is bit-identical to the Triton kernels' (llm_adapters/triton_kernels/dropout.py).
dB / dUp are sums of per-64-row-block partials (a [M/64, N, r] float32 buffer) added in block
order by a second small kernel, and dDn / dA use reduce_rows' fixed-order splits: no atomics,
so gradients are bitwise reproducible.

For float16 / bfloat16 activations every kernel's products run on the tensor cores (16x16x16
WMMA tiles, float32 accumulators; sm_80+): the shrink, the expand, reduce_rows, both products
of the series forward, and g·w, the d_w partials gᵀφ(S) and dh of grad_rows. Each float32
operand (an adapter weight, φ(S), dS) is split into a high and a low part in the activations'
dtype (w = w_hi + w_lo) and both parts are multiplied (in the expand, where both operands are
float32: hi·hi + hi·lo + lo·hi), so the result keeps float32-operand accuracy
(the *_tc_block functions of csrc/shrink.cuh, expand.cuh, reduce_rows.cuh, row_block.cuh).
float32 activations, GPUs below sm_80 and LLM_ADAPTERS_CUDA_TENSOR_CORES=0 (read once, at
import, into `TENSOR_CORES`) use the CUDA-core kernels instead.

The extension also registers CPU implementations of its ops that run the kernels' own code on
host threads (csrc/ops.cpp, emulate()): the functions below then work on CPU tensors, slowly,
which is how the kernels are checked without a GPU. The dispatcher still sends only CUDA
tensors here (`supports_device`).
Rank-sized intermediates (S, G, dS: [M, r]) are float32; the non-linearity's derivative is
applied to them with the same formulas as the torch backend. Activations: float16, bfloat16
and float32 (float64 stays on the torch backend). Adapter weights are read in float32.
"""

from __future__ import annotations

import importlib
import os
import threading

import torch
from torch import Tensor

from .. import _cuda_build
from .._numerics import ACTIVATION_CODES, dropout_threshold
from . import _cuda_ops

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "how": "", "import_error": None}


def _import_prebuilt() -> str | None:
    """Import the ahead-of-time build; None on success, else why it failed."""
    if _state["import_error"] is not None:
        return str(_state["import_error"])
    _cuda_ops.define()  # the schemas first: the library only registers kernels for them
    try:
        module = importlib.import_module("llm_adapters._C")
    except (ImportError, OSError) as exc:  # not built, or built against another torch
        _state["import_error"] = f"llm_adapters._C is not built ({type(exc).__name__}: {exc})"
        return str(_state["import_error"])
    _state["loaded"] = True
    _state["how"] = f"llm_adapters._C imported from {getattr(module, '__file__', '?')}"
    return None


def extension_status() -> tuple[bool, str]:
    """(loaded, reason): whether the compiled kernels are loaded in this process, and how —
    or why not and whether a JIT build would be attempted on first use. Never compiles."""
    with _lock:
        if _state["loaded"]:
            return True, str(_state["how"])
        why = _import_prebuilt()
        if why is None:
            return True, str(_state["how"])
    jit_reason = _cuda_build.jit_unavailable_reason()
    if jit_reason is None:
        return False, f"{why}; it will be JIT-built on first use of backend='cuda'"
    return False, f"{why}; a JIT build is not possible: {jit_reason}"


def ready_without_compile() -> bool:
    """Whether the kernels can be used without compiling anything: loaded, built ahead of time,
    or JIT-built earlier into the cache with nothing newer in csrc/ (`auto` takes the cuda
    backend into account only then)."""
    loaded, _ = extension_status()
    return loaded or _cuda_build.jit_cached() is not None


def load_extension(verbose: bool = False, prefer_prebuilt: bool = True):
    """Load the kernels (import the prebuilt extension, else JIT-build it) and return
    `torch.ops.llm_adapters_C`. Raises RuntimeError naming the reason when neither works.
    `prefer_prebuilt=False` always goes through the JIT build (csrc/build_check.sh)."""
    with _lock:
        if not _state["loaded"] and (not prefer_prebuilt or _import_prebuilt() is not None):
            _cuda_ops.define()
            path = _cuda_build.jit_build(verbose=verbose)
            _state["loaded"] = True
            _state["how"] = f"JIT-built and loaded from {path}"
    return torch.ops.llm_adapters_C


def _check_dtype(t: Tensor, name: str) -> None:
    if t.dtype not in _DTYPES:
        raise TypeError(
            f"the cuda backend runs float16, bfloat16 and float32; {name} is {t.dtype} "
            f"(use backend='torch' for float64)"
        )


def _dropout(p: float) -> tuple[int, float]:
    """(16-bit threshold, 1 / realised keep probability); (0, 1.0) when p == 0."""
    return dropout_threshold(p) if p > 0.0 else (0, 1.0)


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(torch.float32)


def _rank_rows(w: Tensor) -> Tensor:
    """A [r, n] weight as the contiguous float32 [n, r] operand of expand_add_ / shrink."""
    return w.to(torch.float32).t().contiguous()


def _scale(scale_t: Tensor | None, scaling: float) -> Tensor | float:
    return scaling if scale_t is None else scale_t.to(torch.float32)


def _empty(g: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return g.new_empty(0, dtype=dtype)


# Whether the kernels of float16 / bfloat16 activations run on the tensor cores (see the module
# docstring); read once, at import. Tests and benchmarks may set it directly.
def tensor_cores_from_env(environ=os.environ) -> bool:
    """LLM_ADAPTERS_CUDA_TENSOR_CORES: "0" turns the tensor-core kernels (shrink, expand,
    reduce_rows, the series forward, grad_rows) off; unset or any other value leaves them on."""
    return environ.get("LLM_ADAPTERS_CUDA_TENSOR_CORES", "1").strip() != "0"


TENSOR_CORES = tensor_cores_from_env()

# Where d(up) = s·gᵀφ(S) comes from. "partials": the grad_rows pass over g also writes per-64-
# row-block partials ([M/64, N, r] float32) that a second kernel sums in block order; "reduce":
# reduce_rows reads g a second time. "auto" takes the partials while that buffer is no larger
# than g itself (r <= 16 · g's bytes per element: 32 for 16-bit g), i.e. while writing and
# re-reading it moves fewer bytes than reading g again. A byte count, not a timing.
DW_PATH = "auto"


def _dw_from_partials(g: Tensor, r: int) -> bool:
    if DW_PATH not in ("auto", "partials", "reduce"):
        raise ValueError(f"DW_PATH must be 'auto', 'partials' or 'reduce', got {DW_PATH!r}")
    if DW_PATH != "auto":
        return DW_PATH == "partials"
    return 4 * r <= 64 * g.element_size()


def _grad_rows(C, g, s_pre, up, scale_t, scaling, activation, need_up, need_scale,
               dh_w=None, dh_scaling=1.0, threshold=0, seed=0):
    """One pass of g (grad_rows kernel): dS = s·(g·up) ⊙ φ'(S), d(scale) = Σ (g·up) ⊙ φ(S),
    with `dh_w` dh = g + D'(dS dh_w), and d(up) = s·gᵀφ(S) from the same pass (fixed-order sum
    of 64-row partials) or from reduce_rows (see DW_PATH)."""
    act = ACTIVATION_CODES[activation]
    partials = need_up and _dw_from_partials(g, s_pre.shape[1])
    ds, d_up, row_terms, dh = C.grad_rows(
        g, up.to(torch.float32).contiguous(), s_pre, act, _f32(scale_t),
        float(scaling) if scale_t is None else 1.0, partials, bool(need_scale), dh_w,
        float(dh_scaling), int(threshold), int(seed), TENSOR_CORES,
    )
    if need_up and not partials:
        d_up = C.reduce_rows(g, s_pre, act, 0, 0, TENSOR_CORES).mul_(_scale(scale_t, scaling))
    d_scale = row_terms.sum() if need_scale else None
    return ds, (d_up if need_up else None), d_scale, dh


def lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b; see ops/_backend.py for the contract."""
    _check_dtype(x, "x")
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    s_pre = C.shrink(x, _f32(a), _f32(a_bias), threshold, inv_keep, int(seed), TENSOR_CORES)
    if b_bias is not None:  # b_bias is not scaled: fold it into the base bias (N-sized)
        bias = b_bias.to(x.dtype) if bias is None else bias + b_bias.to(x.dtype)
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    y = y.contiguous()
    C.expand_add_(
        y, None, s_pre, ACTIVATION_CODES[activation], _f32(b).contiguous(), None,
        _f32(scale_t), float(scaling) if scale_t is None else 1.0, 0, 0, TENSOR_CORES,
    )
    return y, s_pre, _empty(x, torch.bool)


def lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The 7 gradients (dx, dbias, dA, dB, da_bias, db_bias, dscale) of lora_forward."""
    return _lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre,
                          needs)


def lora_add_forward(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation):
    """y = y0 + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b: the shrink, then the expand into a new y with y0
    as its input (y0 read once, never written) and b_b as its bias; see ops/_backend.py."""
    _check_dtype(x, "x")
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    s_pre = C.shrink(x, _f32(a), _f32(a_bias), threshold, inv_keep, int(seed), TENSOR_CORES)
    y0 = y0.contiguous()
    y = torch.empty_like(y0)
    C.expand_add_(
        y, y0, s_pre, ACTIVATION_CODES[activation], _f32(b).contiguous(),
        None if b_bias is None else _f32(b_bias).contiguous(), _f32(scale_t),
        float(scaling) if scale_t is None else 1.0, 0, 0, TENSOR_CORES,
    )
    return y, s_pre, _empty(x, torch.bool)


def lora_add_backward(g, x, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The 6 gradients (dx, dA, dB, da_bias, db_bias, dscale) of lora_add_forward; dx is the
    branch's D'(dS A) only (the base layer's backward adds its own through y0)."""
    need_dx, *rest = needs
    out = _lora_backward(g, x, None, a, b, scale_t, scaling, p, seed, activation, s_pre,
                         (need_dx, False, *rest))
    return (out[0], *out[2:])


def _lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, needs):
    """lora_backward, or with weight None lora_add_backward's terms (no g W in dx)."""
    _check_dtype(g, "g")
    need_dx, need_bias, need_a, need_b, need_ab, need_bb, need_scale = (bool(n) for n in needs)
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    seed = int(seed)
    s_pre = s_pre.contiguous()
    g = g.contiguous()
    ds = d_b = d_scale = None
    if need_dx or need_a or need_ab or need_b or need_scale:
        ds, d_b, d_scale, _ = _grad_rows(C, g, s_pre, b, scale_t, scaling, activation, need_b,
                                         need_scale)
    dx = _empty(g, g.dtype)
    if need_dx:
        if weight is not None:
            dx = (g @ weight).contiguous()
        else:  # the expand adds into its output, so it starts from zeros (a memset)
            dx = torch.zeros((g.shape[0], x.shape[1]), dtype=g.dtype, device=g.device)
        C.expand_add_(dx, None, ds, 0, _rank_rows(a), None, None, inv_keep, threshold, seed,
                      TENSOR_CORES)
    d_a = _empty(g)
    if need_a:
        d_a = C.reduce_rows(x, ds, 0, threshold, seed, TENSOR_CORES)
        d_a = d_a.mul_(inv_keep).t().contiguous()
    g_sum = g.sum(0, dtype=torch.float32) if (need_bias or need_bb) else None
    return (
        dx,
        g_sum.clone() if need_bias else _empty(g),
        d_a,
        d_b if need_b else _empty(g),
        ds.sum(0) if need_ab else _empty(g),
        g_sum if need_bb else _empty(g),
        d_scale if need_scale else _empty(g),
    )


def _dora_terms(g, col_scale, t, need_bias, need_col):
    """gc = c ⊙ g (g's dtype), dbias = Σ g and dc = Σ g ⊙ T (float32)."""
    if need_col and t.dim() != 2:  # an empty [0]: no T kept
        raise RuntimeError("the DoRA column scale needs a gradient, but its forward ran with "
                           "save_t=False and kept no T")
    gc = (g * col_scale).to(g.dtype)
    d_bias = g.sum(0, dtype=torch.float32) if need_bias else _empty(g)
    d_col = (g.float() * t).sum(0) if need_col else _empty(g)
    return gc, d_bias, d_col


def _dora_forward(x, weight, y0, a, b, bias, col_scale, scaling, p, seed, save_t):
    """DoRA's forward for dora_forward (y0 None: the expand adds into y = x Wᵀ from cuBLAS, in
    place) and dora_add_forward (into a new y from y0): S = shrink(x, A), then the expand with
    the column scale and bias in its epilogue, y = c ⊙ (in + s·S Bᵀ) + bias rounded once from
    the float32 sum, and T = in + s·S Bᵀ into a new tensor when `save_t` (else an empty one)."""
    _check_dtype(x, "x")
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    s_pre = C.shrink(x, _f32(a), None, threshold, inv_keep, int(seed), TENSOR_CORES)
    if y0 is None:
        y, y_in = (x @ weight.t()).contiguous(), None
    else:
        y_in = y0.contiguous()
        y = torch.empty_like(y_in)
    t = torch.empty_like(y) if save_t else x.new_empty(0)
    C.expand_add_(
        y, y_in, s_pre, ACTIVATION_CODES["identity"], _f32(b).contiguous(),
        None if bias is None else _f32(bias).contiguous(), None, float(scaling), 0, 0,
        TENSOR_CORES, col_scale.to(torch.float32).contiguous(), t if save_t else None,
    )
    return y, s_pre, _empty(x, torch.bool), t


def dora_forward(x, weight, bias, a, b, col_scale, scaling, p, seed, save_t):
    """DoRA (ops/_backend.py): S = shrink(x, A), y = x Wᵀ (cuBLAS), then the expand with the
    column scale and bias in its epilogue (`_dora_forward`)."""
    return _dora_forward(x, weight, None, a, b, bias, col_scale, scaling, p, seed, save_t)


def dora_backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    """(dx, dbias, da, db, dcol): lora_backward's kernels on gc = c ⊙ g."""
    need_dx, need_bias, need_a, need_b, need_col = (bool(v) for v in needs)
    gc, d_bias, d_col = _dora_terms(g, col_scale, t, need_bias, need_col)
    dx, _, d_a, d_b, *_ = _lora_backward(gc, x, weight, a, b, None, scaling, p, seed,
                                         "identity", s_pre,
                                         (need_dx, False, need_a, need_b, False, False, False))
    return dx, d_bias, d_a, d_b, d_col


def dora_add_forward(x, y0, a, b, bias, col_scale, scaling, p, seed, save_t):
    """DoRA over a base output y0 without its bias: the shrink, then the expand from y0 into a
    new y with the column scale and bias in its epilogue (`_dora_forward`)."""
    return _dora_forward(x, None, y0, a, b, bias, col_scale, scaling, p, seed, save_t)


def dora_add_backward(g, x, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs):
    """(dx, dy0, da, db, dbias, dcol): dx the branch's term only, dy0 = c ⊙ g."""
    need_dx, need_y0, need_a, need_b, need_bias, need_col = (bool(v) for v in needs)
    gc, d_bias, d_col = _dora_terms(g, col_scale, t, need_bias, need_col)
    dx, _, d_a, d_b, *_ = _lora_backward(gc, x, None, a, b, None, scaling, p, seed,
                                         "identity", s_pre,
                                         (need_dx, False, need_a, need_b, False, False, False))
    return dx, gc if need_y0 else _empty(g, g.dtype), d_a, d_b, d_bias, d_col


def series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation):
    """z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b; see ops/_backend.py for the contract."""
    _check_dtype(h, "h")
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    z, s_pre = C.series_forward(
        h.contiguous(), _rank_rows(down), _f32(up).contiguous(),
        None if down_bias is None else _f32(down_bias).contiguous(),
        None if up_bias is None else _f32(up_bias).contiguous(),
        _f32(scale_t), float(scaling) if scale_t is None else 1.0,
        ACTIVATION_CODES[activation], threshold, inv_keep, int(seed), TENSOR_CORES,
    )
    return z, s_pre, _empty(h, torch.bool)


def series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """The 6 gradients (dh, dDn, dUp, d_db, d_ub, dscale) of series_forward."""
    _check_dtype(g, "g")
    need_dh, need_down, need_up, need_db, need_ub, need_scale = (bool(n) for n in needs)
    C = load_extension()
    threshold, inv_keep = _dropout(p)
    seed = int(seed)
    s_pre = s_pre.contiguous()
    g = g.contiguous()
    ds, d_up, d_scale, dh = _grad_rows(
        C, g, s_pre, up, scale_t, scaling, activation, need_up, need_scale,
        _rank_rows(down) if need_dh else None, inv_keep, threshold, seed,
    )
    if not need_dh:
        dh = _empty(g, g.dtype)
    d_down = _empty(g)
    if need_down:
        d_down = C.reduce_rows(h, ds, 0, threshold, seed, TENSOR_CORES)
        d_down = d_down.mul_(inv_keep).t().contiguous()
    return (
        dh,
        d_down,
        d_up if need_up else _empty(g),
        ds.sum(0) if need_db else _empty(g),
        g.sum(0, dtype=torch.float32) if need_ub else _empty(g),
        d_scale if need_scale else _empty(g),
    )


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> Tensor:
    """The bool keep-mask the CUDA kernels regenerate for `seed` on a 2-D input of `shape`
    (True = kept). Runs on CUDA, and on CPU with the same Philox code compiled for the host."""
    C = load_extension()
    threshold, _ = _dropout(float(p))
    out = torch.empty(tuple(int(d) for d in shape), dtype=torch.bool, device=device)
    C.keep_mask_(out, threshold, int(seed))
    return out


class _CudaBackend:
    name = "cuda"
    ops = frozenset({"lora", "series", "lora_add", "dora", "dora_add"})
    stores_mask = False

    @staticmethod
    def available() -> str | None:
        loaded, reason = extension_status()
        if loaded or _cuda_build.jit_unavailable_reason() is None:
            return None
        return reason

    @staticmethod
    def supports_device(device: torch.device) -> str | None:
        if torch.device(device).type == "cuda":
            return None
        return f"the CUDA kernels run CUDA tensors only (got a {torch.device(device).type} tensor)"

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


BACKEND = _CudaBackend()
