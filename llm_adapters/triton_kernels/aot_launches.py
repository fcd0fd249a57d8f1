"""The launch registry and enumeration of the ahead-of-time compile check (`aot`).

`KERNELS` names every Triton kernel with its real (non-interpreter) config list; the launchers
themselves (`lora`, `dora`, `series`, `grouped`, `dropout`) are called on meta tensors with each
kernel replaced by a recorder (`_recording`), and `enumerate_launches` groups the recorded
launches into launch variants (same signature after Triton's integer/alignment
specialisation, same constexprs). `aot` plans, compiles and checks them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import multiprocessing
import sys

import torch

from . import _limits, dora, dropout, grouped, lora, series

TARGETS = _limits.TARGETS  # cc -> shared memory per block (bytes)

# kernel id -> (module, attribute, the real (non-interpreter) config list, shared-memory model)
# model(kernel attribute, config, named args incl. constexprs, cc) -> bytes
KERNELS = {
    "lora._shrink_kernel": (lora, "_shrink_kernel", lambda: lora._shrink_configs(False)),
    "lora._main_kernel": (lora, "_main_kernel", lambda: lora._gemm_configs(False)),
    "lora._reduce_kernel": (lora, "_reduce_kernel", lambda: lora._reduce_configs(False)),
    "lora._dx_kernel": (lora, "_dx_kernel", lambda: lora._gemm_configs(False)),
    "series._series_forward_kernel": (
        series, "_series_forward_kernel", lambda: series._configs("rows", False)
    ),
    "series._series_backward_rows_kernel": (
        series, "_series_backward_rows_kernel", lambda: series._configs("rows", False)
    ),
    "series._series_backward_weights_kernel": (
        series, "_series_backward_weights_kernel", lambda: series._configs("weights", False)
    ),
    "dropout._keep_mask_kernel": (dropout, "_keep_mask_kernel", None),
    "grouped._grouped_shrink_kernel": (
        grouped, "_grouped_shrink_kernel", lambda: grouped._shrink_configs(False)
    ),
    "grouped._grouped_expand_kernel": (
        grouped, "_grouped_expand_kernel", lambda: grouped._expand_configs(False)
    ),
}

GRIDS = {
    "full": {
        "KN": (4096, 11008),
        "M": (512, 8192),
        "r": (1, 8, 16, 64, 256, 512),
    },
}

_SEED = 2**62 - 57  # a drawn seed is a 62-bit integer (ops draws them so): i64, unaligned
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TRITON_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
    torch.float64: "fp64", torch.int8: "i8", torch.int32: "i32", torch.int64: "i64",
    torch.bool: "i1",
}


# ---- 1. enumeration --------------------------------------------------------------------------


# the kernel objects themselves (the recorder replaces the module attributes while enumerating)
_OBJECTS = {kid: getattr(module, attr) for kid, (module, attr, _) in KERNELS.items()}


def _jit_fn(kernel_id: str):
    """(JITFunction, autotuner or the JITFunction itself) of a kernel id."""
    obj = _OBJECTS[kernel_id]
    return (obj.fn if hasattr(obj, "configs") else obj), obj


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self, kernel_id: str, sink: list):
        self.kernel_id = kernel_id
        self.sink = sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.kernel_id, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(sink: list):
    saved = []
    try:
        for kid, (module, attr, _) in KERNELS.items():
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, _Recorder(kid, sink))
        yield
    finally:
        for module, attr, obj in saved:
            setattr(module, attr, obj)


def _specialise(value):
    """(Triton signature type, divisible by 16) for a runtime argument, as Triton's launcher
    specialises it; ("constexpr", value) for an integer equal to 1."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], True  # allocations are 16-byte aligned
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"cannot specialise a kernel argument of type {type(value).__name__}")


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _variant_of(kernel_id: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(hashable variant key, named args for the prune function) of one recorded launch."""
    fn, _ = _jit_fn(kernel_id)
    names = fn.arg_names
    named = dict(zip(names, args))
    sig, consts, div = [], [], []
    for i, name in enumerate(names):
        param = fn.params[i]
        if param.is_constexpr:
            if name in kwargs:
                consts.append((name, _jsonable(kwargs[name])))
            elif name in named:
                consts.append((name, _jsonable(named[name])))
            continue  # a config key, filled per config
        value = named[name] if name in named else kwargs[name]
        kind, extra = _specialise(value)
        sig.append((name, kind))
        if kind == "constexpr":
            consts.append((name, extra))
        elif extra:
            div.append(name)
    key = (kernel_id, tuple(sig), tuple(consts), tuple(div))
    return key, named


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _lora_cases():
    """(label, adapter options) for the low-rank branch: LoRA (identity, base bias on/off) and
    the parallel adapter (each activation, branch biases, float or learned scale)."""
    for base_bias in (False, True):
        yield "lora", dict(act="identity", bias=base_bias, ab=False, bb=False, scale_t=False)
    for act in ("tanh", "relu", "gelu", "silu"):
        for biases, scale_t in itertools.product((False, True), (False, True)):
            yield "parallel", dict(act=act, bias=True, ab=biases, bb=biases, scale_t=scale_t)


def _series_cases():
    for act in ("identity", "tanh", "relu", "gelu", "silu"):
        for biases, scale_t in itertools.product((False, True), (False, True)):
            yield "series", dict(act=act, db=biases, ub=biases, scale_t=scale_t)


# (dx, dbias, da, db, da_bias, db_bias, dscale) of a LoRA backward: adapter trained with and
# without an input gradient (first layer), and a frozen adapter passing the gradient through.
_LORA_NEEDS = ("train", "train-no-dx", "frozen")
# (dh, ddown, dup, ddown_bias, dup_bias, dscale) of a series backward
_SERIES_NEEDS = ("train", "frozen")


def _lora_needs(which, o):
    if which == "frozen":
        return (True, False, False, False, False, False, False)
    return (which == "train", o["bias"], True, True, o["ab"], o["bb"], o["scale_t"])


def _dora_needs(which, bias, save_t, add):
    """(dx, dbias, da, db, dcol) of a DoRA backward, or (dx, dy0, da, db, dbias, dcol) of
    dora_add's; the magnitude trains (dcol) exactly when the forward saved T."""
    if which == "frozen":
        return (True, True, False, False, False, False) if add else (True, *[False] * 4)
    dx = which == "train"
    return (dx, True, True, True, bias, save_t) if add else (dx, bias, True, True, save_t)


def _dora_launches(x, w, bias, a, b, p, m, n, dt):
    """DoRA (the column scale in the epilogues, T saved or not) and dora_add over y0."""
    c, s_pre = _meta((n,), torch.float32), _meta((m, a.shape[0]), torch.float32)
    no_mask = x.new_empty(0, dtype=torch.bool)
    for save_t in (False, True):
        t = _meta((m, n), dt) if save_t else _meta((0,), dt)
        dora.dora_forward(x, w, bias, a, b, c, 2.0, p, _SEED, save_t)
        dora.dora_add_forward(x, _meta((m, n), dt), a, b, bias, c, 2.0, p, _SEED, save_t)
        for which in _LORA_NEEDS:
            g = _meta((m, n), dt)
            dora.dora_backward(g, x, w, a, b, c, 2.0, p, _SEED, s_pre, no_mask, t,
                               _dora_needs(which, bias is not None, save_t, False))
            dora.dora_add_backward(g, x, a, b, c, 2.0, p, _SEED, s_pre, no_mask, t,
                                   _dora_needs(which, bias is not None, save_t, True))


def _series_needs(which, o):
    if which == "frozen":
        return (True, False, False, False, False, False)
    return (True, True, True, o["db"], o["ub"], o["scale_t"])


@contextlib.contextmanager
def _restoring_tf32(value: bool):
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = value


def _enumerate_dtype(dname: str, grid: dict) -> dict[tuple, dict]:
    """The launch variants of one activation dtype over `grid` (see enumerate_launches)."""
    dt = _DTYPES[dname]
    variants: dict[tuple, dict] = {}
    sink: list = []

    def collect(label):
        for kernel_id, args, kwargs in sink:
            key, named = _variant_of(kernel_id, args, kwargs)
            v = variants.get(key)
            if v is None:
                variants[key] = {
                    "kernel": kernel_id, "signature": key[1], "constexprs": key[2],
                    "divisible": key[3], "named_args": named, "kwargs": dict(kwargs),
                    "count": 1, "example": label,
                }
            else:
                v["count"] += 1
        sink.clear()

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    with _recording(sink), _restoring_tf32(allow_tf32):
        # fp32 products follow torch's allow_tf32 (`_numerics.fp32_ieee`): IEEE by default,
        # TF32 tensor cores when the user allows them
        tf32s = (False, True) if dt is torch.float32 else (False,)
        for m, kn, r, p, tf32 in itertools.product(
            grid["M"], grid["KN"], grid["r"], (0.0, 0.1), tf32s
        ):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            k = n = kn
            for (kind, o), wdt in itertools.product(_lora_cases(), {dt, torch.float32}):
                x, w = _meta((m, k), dt), _meta((n, k), dt)
                a, b = _meta((r, k), wdt), _meta((n, r), wdt)
                bias = _meta((n,), dt) if o["bias"] else None
                ab = _meta((r,), wdt) if o["ab"] else None
                bb = _meta((n,), wdt) if o["bb"] else None
                st = _meta((), torch.float32) if o["scale_t"] else None
                label = f"{kind} {dname} M={m} K=N={kn} r={r} p={p} {o} w={wdt} tf32={tf32}"
                lora.lora_forward(x, w, bias, a, b, ab, bb, st, 2.0, p, _SEED, o["act"])
                # lora_add: the main and dx kernels without their base GEMM (HAS_BASE=False)
                lora.lora_add_forward(x, _meta((m, n), dt), a, b, ab, bb, st, 2.0, p, _SEED,
                                      o["act"])
                s_pre, no_mask = _meta((m, r), torch.float32), x.new_empty(0, dtype=torch.bool)
                for which in _LORA_NEEDS:
                    nd, g = _lora_needs(which, o), _meta((m, n), dt)
                    lora.lora_backward(g, x, w, a, b, st, 2.0, p, _SEED, o["act"], s_pre,
                                       no_mask, nd)
                    lora.lora_add_backward(g, x, a, b, st, 2.0, p, _SEED, o["act"], s_pre,
                                           no_mask, (nd[0], *nd[2:]))
                if kind == "lora":
                    _dora_launches(x, w, bias, a, b, p, m, n, dt)
                collect(label)
            for kind, o in _series_cases():
                h = _meta((m, n), dt)
                dn, up = _meta((r, n), dt), _meta((n, r), dt)
                db = _meta((r,), dt) if o["db"] else None
                ub = _meta((n,), dt) if o["ub"] else None
                st = _meta((), torch.float32) if o["scale_t"] else None
                label = f"{kind} {dname} M={m} N={kn} r={r} p={p} {o} tf32={tf32}"
                series.series_forward(h, dn, up, db, ub, st, 1.0, p, _SEED, o["act"])
                s_pre = _meta((m, r), torch.float32)
                for which in _SERIES_NEEDS:
                    series.series_backward(
                        _meta((m, n), dt), h, dn, up, st, 1.0, p, _SEED, o["act"], s_pre,
                        h.new_empty(0, dtype=torch.bool), _series_needs(which, o),
                    )
                collect(label)
            for g in (1, 4, 32) if p == 0 else ():  # mixed-adapter batches (no dropout)
                idx = _meta((m,), torch.int64)
                grouped.grouped_lora_add(_meta((m, kn), dt), _meta((m, kn), dt), idx,
                                         [_meta((r, kn), dt)] * g, [_meta((kn, r), dt)] * g,
                                         [2.0] * g)
                collect(f"grouped {dname} M={m} K=N={kn} r={r} G={g} tf32={tf32}")
            if p > 0 and dname == "bf16" and not tf32:
                dropout.keep_mask((m, kn), p, _SEED, torch.device("meta"))
                collect(f"keep_mask M={m} K={kn} p={p}")
    return variants


def enumerate_launches(grid: dict | None = None, jobs: int = 1) -> list[dict]:
    """Every launch variant the launchers produce over `grid` (default: the full grid), for
    bf16, fp16 and fp32 activations (adapter weights in the activations' dtype or fp32), with
    and without dropout, over the LoRA, parallel-adapter and series cases. Each variant is a
    dict: kernel, signature [(name, type)], constexprs [(name, value)], divisible [names],
    named args (meta tensors, for the prune function), kwargs, count and a first example.
    `jobs` > 1 enumerates the dtypes in parallel processes."""
    grid = grid or GRIDS["full"]
    if jobs > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, 3), mp_context=ctx) as pool:
            parts = list(pool.map(_enumerate_dtype, _DTYPES, [grid] * len(_DTYPES)))
    else:
        parts = [_enumerate_dtype(d, grid) for d in _DTYPES]
    merged: dict[tuple, dict] = {}
    for part in parts:
        for key, v in part.items():
            if key in merged:
                merged[key]["count"] += v["count"]
            else:
                merged[key] = v
    return list(merged.values())
