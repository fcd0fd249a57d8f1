"""Single-kernel timings of the `cuda` backend: the skinny GEMMs alone, both variants.

    shrink       S = D(x) Aᵀ · c          x [M, K] (float16 / bfloat16), A [r, K] f32 -> [M, r]
    reduce_rows  dA = Σ_m D(X)[m, :]ᵀ dS   X [M, N] (float16 / bfloat16), dS [M, r] f32 -> [N, r]

Each reads its activation once and writes a rank-sized result, so its speed is the bandwidth
at which it reads it: GB/s = M·K·(bytes per element) / time, reported against the device's
peak (`harness.ROOFLINES`, or `--peak-tbps`). Variants: `tensor_cores` (WMMA tiles, the
default for 16-bit activations) and `cuda_cores` (float32 FMAs;
LLM_ADAPTERS_CUDA_TENSOR_CORES=0).

    python -m llm_adapters.bench.kernels --m 512 2048 8192 16384 --k 4096 --r 16 \
        --dtype bfloat16 [--kernels shrink reduce_rows] --out OUT_DIR

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

from ..ops import cuda_backend
from ..ops.torch_backend import dropout_threshold
from .harness import device_name, roofline

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


def shrink_bandwidth(
    ms=(512, 2048, 8192, 16384),
    k: int = 4096,
    r: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    p: float = 0.0,
    reps: int = 50,
    peak_tbps: Optional[float] = None,
    variants=tuple(VARIANTS),
) -> list[dict]:
    """One row per (M, variant): median time (ms), GB/s of x read, % of the peak bandwidth
    (None when the peak is unknown), and the max abs difference from the other variant's S.

    x [M, K] in `dtype`, A [r, K] float32 ~ N(0, 1/K), dropout `p` (fused keep-mask)."""
    dev = torch.device(device)
    ext = cuda_backend.load_extension()
    if peak_tbps is None:
        peak_tbps = roofline(dev)[1]
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=dev) if dev.type == "cuda" \
        else None
    threshold, inv_keep = dropout_threshold(p) if p > 0 else (0, 1.0)
    rows = []
    for m in ms:
        gen = torch.Generator(device=dev).manual_seed(m)
        x = torch.randn(m, k, generator=gen, device=dev).to(dtype)
        a = torch.randn(r, k, generator=gen, device=dev) * k**-0.5
        results = {}
        for name in variants:
            tc = VARIANTS[name]
            fn = functools.partial(ext.shrink, x, a, None, threshold, inv_keep, 7, tc)
            results[name] = fn()
            times = _time_ms(fn, dev, reps, flush)
            ms_med = statistics.median(times)
            gbps = m * k * x.element_size() / (ms_med * 1e-3) / 1e9
            rows.append({
                "kernel": "shrink", "variant": name, "m": m, "k": k, "r": r,
                "dtype": str(dtype).replace("torch.", ""), "dropout": p, "ms": ms_med,
                "gbps": gbps, "pct_peak": None if not peak_tbps else 100 * gbps / (peak_tbps * 1e3),
                "device": device_name(dev), "reps": reps,
            })
        if len(results) == 2:
            one, two = results.values()
            diff = (one - two).abs().max().item()
            for row in rows[-2:]:
                row["max_abs_diff_between_variants"] = diff
    return rows


def reduce_rows_bandwidth(
    ms=(512, 2048, 8192, 16384),
    n: int = 4096,
    r: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    p: float = 0.0,
    reps: int = 50,
    peak_tbps: Optional[float] = None,
    variants=tuple(VARIANTS),
) -> list[dict]:
    """As `shrink_bandwidth` for reduce_rows, dA = Σ_m D(X)[m, :]ᵀ dS[m, :]: X [M, N] in
    `dtype`, dS [M, r] float32; GB/s of X read (the column `k` holds N)."""
    dev = torch.device(device)
    ext = cuda_backend.load_extension()
    if peak_tbps is None:
        peak_tbps = roofline(dev)[1]
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device=dev) if dev.type == "cuda" \
        else None
    threshold = dropout_threshold(p)[0] if p > 0 else 0
    rows = []
    for m in ms:
        gen = torch.Generator(device=dev).manual_seed(m)
        x = torch.randn(m, n, generator=gen, device=dev).to(dtype)
        h = torch.randn(m, r, generator=gen, device=dev)
        results = {}
        for name in variants:
            fn = functools.partial(ext.reduce_rows, x, h, 0, threshold, 7, VARIANTS[name])
            results[name] = fn()
            ms_med = statistics.median(_time_ms(fn, dev, reps, flush))
            gbps = m * n * x.element_size() / (ms_med * 1e-3) / 1e9
            rows.append({
                "kernel": "reduce_rows", "variant": name, "m": m, "k": n, "r": r,
                "dtype": str(dtype).replace("torch.", ""), "dropout": p, "ms": ms_med,
                "gbps": gbps, "pct_peak": None if not peak_tbps else 100 * gbps / (peak_tbps * 1e3),
                "device": device_name(dev), "reps": reps,
            })
        if len(results) == 2:
            one, two = results.values()
            diff = (one - two).abs().max().item()
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
    parser.add_argument("--kernels", nargs="+", choices=["shrink", "reduce_rows"],
                        default=["shrink", "reduce_rows"])
    parser.add_argument("--out", default=None, help="folder for kernels-bandwidth.json")
    args = parser.parse_args(argv)
    rows = []
    for kernel in args.kernels:
        fn = shrink_bandwidth if kernel == "shrink" else reduce_rows_bandwidth
        rows += fn(args.m, args.k, args.r, getattr(torch, args.dtype), args.device,
                   args.dropout, args.reps, args.peak_tbps)
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
