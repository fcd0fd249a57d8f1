"""Single-kernel timings of the `cuda` backend: the skinny rank-r kernels alone.

    shrink       S = D(x) Aᵀ · c          x [M, K] (float16 / bfloat16), A [r, K] f32 -> [M, r]
    expand       y += s·φ(H) Bᵀ, in place  y [M, N] (16-bit), H [M, r], B [N, r] f32 (N = K here)
    reduce_rows  dA = Σ_m D(X)[m, :]ᵀ dS   X [M, N] (float16 / bfloat16), dS [M, r] f32 -> [N, r]
    grad_rows    the LoRA backward's one pass over g [M, N] (16-bit), B [N, r] f32: dS = s·(g B)
                 ⊙ φ'(S) and, where the backend takes them (DW_PATH), the 64-row partials of
                 dB = s·gᵀφ(S); no dh (the series form), so g is the only large operand

Each streams its activation (shrink and reduce_rows read it once, expand reads and writes it)
and touches only rank-sized data besides, so its speed is the bandwidth at which it moves the
activation: GB/s = bytes / time, reported against the device's peak (`results.ROOFLINES`, or
`--peak-tbps`). grad_rows reads g once (its d_w partials, [M/64, N, r] float32, are not
counted). Variants of each: `tensor_cores` (WMMA tiles, the default for 16-bit activations) and
`cuda_cores` (float32 FMAs; LLM_ADAPTERS_CUDA_TENSOR_CORES=0).

    python -m llm_adapters.bench.kernels --m 512 2048 8192 16384 --k 4096 --r 16 \
        --dtype bfloat16 [--kernels shrink expand reduce_rows grad_rows] --out OUT_DIR

Each call is timed with CUDA events after an L2 flush (a 256 MiB write outside the timed
region), so small x is read from memory, not from a warm cache; the median of `--reps` calls
is reported. On a CPU the same code runs the kernels' host emulation: a check of this script,
not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Optional

import torch

from .._numerics import dropout_threshold
from ..ops import cuda_backend
from .results import device_name, roofline

VARIANTS = {"tensor_cores": True, "cuda_cores": False}
_FLUSH_BYTES = 256 * 2**20


def _time_ms(fn, device: torch.device, reps: int, flush: Optional[torch.Tensor]) -> list[float]:
    """Milliseconds of each of `reps` calls of fn (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


KERNELS = ("shrink", "expand", "reduce_rows", "grad_rows")


def _operands(kernel: str, ext, m: int, k: int, r: int, dtype: torch.dtype, dev: torch.device,
              p: float) -> tuple[dict, int]:
    """({variant: a call of the kernel}, bytes of the activation it reads and writes per call).

    shrink: x [M, K] read; expand: out [M, K] read and written in place (the add into the base
    GEMM's output, N = K here); reduce_rows: X [M, K] read; grad_rows: g [M, K] read (N = K)."""
    gen = torch.Generator(device=dev).manual_seed(m)
    act = torch.randn(m, k, generator=gen, device=dev).to(dtype)
    threshold, inv_keep = dropout_threshold(p) if p > 0 else (0, 1.0)
    size = m * k * act.element_size()
    if kernel == "shrink":
        a = torch.randn(r, k, generator=gen, device=dev) * k**-0.5
        return {name: functools.partial(ext.shrink, act, a, None, threshold, inv_keep, 7, tc)
                for name, tc in VARIANTS.items()}, size
    if kernel == "reduce_rows":
        h = torch.randn(m, r, generator=gen, device=dev)
        return {name: functools.partial(ext.reduce_rows, act, h, 0, threshold, 7, tc)
                for name, tc in VARIANTS.items()}, size
    if kernel == "grad_rows":
        s_pre = torch.randn(m, r, generator=gen, device=dev)
        b = torch.randn(k, r, generator=gen, device=dev) * r**-0.5
        partials = cuda_backend._dw_from_partials(act, r)  # as the LoRA backward asks
        gelu = cuda_backend.ACTIVATION_CODES["gelu"]
        return {name: functools.partial(ext.grad_rows, act, b, s_pre, gelu, None, 2.0, partials,
                                        False, None, 1.0, 0, 0, tc)
                for name, tc in VARIANTS.items()}, size
    h = torch.randn(m, r, generator=gen, device=dev)
    w = torch.randn(k, r, generator=gen, device=dev) * 0.01
    outs = {name: act.clone() for name in VARIANTS}  # each variant adds into its own y

    def expand(name: str, tc: bool) -> torch.Tensor:
        ext.expand_add_(outs[name], None, h, 0, w, None, None, 2.0, threshold, 7, tc)
        return outs[name]

    return {name: functools.partial(expand, name, tc) for name, tc in VARIANTS.items()}, 2 * size


def kernel_bandwidth(
    kernel: str,
    ms=(512, 2048, 8192, 16384),
    k: int = 4096,
    r: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    p: float = 0.0,
    reps: int = 50,
    peak_tbps: Optional[float] = None,
) -> list[dict]:
    """One row per (M, variant) of `kernel` (see KERNELS): median time (ms), GB/s of the
    activation moved, % of the peak bandwidth (None when the peak is unknown) and, where there
    are two variants, the max abs difference between their results. Dropout `p` is fused."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    dev = torch.device(device)
    ext = cuda_backend.load_extension()
    if peak_tbps is None:
        peak_tbps = roofline(dev)[1]
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=dev) if dev.type == "cuda" \
        else None
    rows = []
    for m in ms:
        calls, nbytes = _operands(kernel, ext, m, k, r, dtype, dev, p)
        results = {}
        for name, fn in calls.items():
            first = fn()  # copied: the timed calls that follow may write into it (expand)
            results[name] = tuple(t.clone() for t in
                                  (first if isinstance(first, (tuple, list)) else (first,)))
            ms_med = statistics.median(_time_ms(fn, dev, reps, flush))
            gbps = nbytes / (ms_med * 1e-3) / 1e9
            rows.append({
                "kernel": kernel, "variant": name, "m": m, "k": k, "r": r,
                "dtype": str(dtype).replace("torch.", ""), "dropout": p, "ms": ms_med,
                "gbps": gbps, "pct_peak": None if not peak_tbps else 100 * gbps / (peak_tbps * 1e3),
                "device": device_name(dev), "reps": reps,
            })
        if len(results) == 2:
            one, two = results.values()
            diff = max((a - b).abs().max().item() for a, b in zip(one, two) if a.numel())
            for row in rows[-2:]:
                row["max_abs_diff_between_variants"] = diff
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'kernel':>11} {'M':>6} {'K|N':>5} {'r':>3} {'dtype':>8} {'variant':>12} "
             f"{'ms':>9} {'GB/s':>8} {'% peak':>7}"]
    for row in rows:
        pct = "-" if row["pct_peak"] is None else f"{row['pct_peak']:.1f}"
        lines.append(f"{row['kernel']:>11} {row['m']:>6} {row['k']:>5} {row['r']:>3} "
                     f"{row['dtype']:>8} {row['variant']:>12} {row['ms']:>9.4f} "
                     f"{row['gbps']:>8.1f} {pct:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--peak-tbps", type=float, default=None,
                        help="peak memory bandwidth (TB/s); default: the known device's")
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    parser.add_argument("--out", default=None, help="folder for kernels-bandwidth.json")
    args = parser.parse_args(argv)
    rows = []
    for kernel in args.kernels:
        rows += kernel_bandwidth(kernel, args.m, args.k, args.r, getattr(torch, args.dtype),
                                 args.device, args.dropout, args.reps, args.peak_tbps)
    print(f"kernel bandwidth on {rows[0]['device'] if rows else args.device}")
    print(format_rows(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "kernels-bandwidth.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
