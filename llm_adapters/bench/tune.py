"""`llm-adapters tune-backends`: measure which backend is faster per shape on this GPU.

The opt-in way to write the table `auto` reads (llm_adapters/ops/_choice.py): `auto` itself
never measures. Times a training step (forward + backward) of each op with every backend that
can run it over a grid of shapes, prints the winner per shape with the cuda / triton time
ratio, and adds the rows to the user's table (`$LLM_ADAPTERS_CACHE_DIR/backend_choice/`,
default under `~/.cache/llm_adapters`), which `auto` reads in every later process: there it
sends a shape to the cuda backend where its row has cuda faster than triton. `--out FILE` also
writes the rows measured now as a table file of the shipped format, ready to be placed in
llm_adapters/ops/backend_tables/; `--no-save` leaves the user's table alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from ..ops import _choice, _dispatch

GPU_GRID = dict(ops=["lora", "series"], dtype=["bfloat16"], m=[128, 512, 1024, 2048, 4096,
                8192, 16384], hidden=[4096], r=[16, 64], dropout=[0.0, 0.05])
CPU_GRID = dict(ops=["lora", "series"], dtype=["float32"], m=[64, 1024], hidden=[256], r=[16],
                dropout=[0.0])


# ------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(key: tuple, m: int, device: torch.device) -> dict[str, Any]:
    op, dtype_name, _, k, n, r, dropout = key
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype, req=False):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(dt).requires_grad_(req)

    p = 0.05 if dropout else 0.0
    if op == "lora":
        return dict(
            args=(rand(m, k, req=True), rand(n, k, scale=k ** -0.5), None,
                  rand(r, k, scale=k ** -0.5, dt=torch.float32, req=True),
                  rand(n, r, scale=0.01, dt=torch.float32, req=True)),
            kwargs=dict(scaling=2.0, dropout_p=p, seed=1234),
            grad_out=rand(m, n),
        )
    return dict(
        args=(rand(m, n, req=True), rand(r, n, scale=n ** -0.5, dt=torch.float32, req=True),
              rand(n, r, scale=0.01, dt=torch.float32, req=True)),
        kwargs=dict(scaling=1.0, dropout_p=p, seed=1234),
        grad_out=rand(m, n),
    )


def time_backend(key: tuple, m: int, backend: str, device: torch.device, repeats: int = 5,
                 warmup: int = 2) -> float:
    """Median milliseconds of one forward + backward of the op at `key` with M = m rows, on
    `backend`. Warm-up calls first (Triton compiles and autotunes there)."""
    from ..ops import lora_linear, series_adapter  # the public ops, with an explicit backend

    fn = lora_linear if key[0] == "lora" else series_adapter
    data = _inputs(key, m, device)

    def once():
        fn(*data["args"], **data["kwargs"], backend=backend).backward(data["grad_out"])

    with torch.enable_grad():
        for _ in range(warmup):
            once()
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(key: tuple, m: int, backends: list[str], device: torch.device,
            repeats: int = 5) -> dict[str, float]:
    """{backend: median ms} at `key` (M = m rows); a backend that fails is left out. Candidates
    run interleaved, twice each, keeping each one's best median, so a slow moment of the machine
    does not decide the choice."""
    results: dict[str, float] = {}
    for _ in range(2):
        for name in backends:
            try:
                ms = time_backend(key, m, name, device, repeats=repeats)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - a backend failing here is no choice
                warnings.warn(
                    f"tune-backends: backend {name!r} failed at {key} and is left out: "
                    f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            results[name] = min(ms, results.get(name, math.inf))
    return results


# ------------------------------------------------------------------------------------------
# writing tables (the only place in the package that writes one)
# ------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from .. import __version__

        out["llm_adapters"] = __version__
    except ImportError:
        pass
    return out


def write_table(path: Path, device: str, rows: _choice.Rows, merge: bool = True) -> Path:
    """Write `rows` for GPU model `device` to `path` atomically (a concurrent reader sees the
    old file or the new one, whole). With `merge`, rows already in the file for other keys are
    kept (several ranks of a job may tune at once); a key measured now replaces its old row."""
    if merge:
        rows = {**_choice.read_table(path, device), **rows}
    out_rows = [
        {**dict(zip(_choice.KEY_FIELDS, key)),
         "ms": {b: round(t, 5) for b, t in sorted(ms.items())}}
        for key, ms in sorted(rows.items())
    ]
    head = {
        "format": _choice.FORMAT,
        "device": device,
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:  # one row per line: diffs of a shipped table stay readable
        text = json.dumps(head, indent=1)
        f.write(text[:-2] + ',\n "rows": [\n')
        f.write(",\n".join("  " + json.dumps(row) for row in out_rows))
        f.write("\n ]\n}\n")
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--op", nargs="+", choices=["lora", "series"], default=None)
    p.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"],
                   default=None)
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="row counts M")
    p.add_argument("--hidden", nargs="+", type=int, default=None,
                   help="K = N of the LoRA layer, hidden size of the series adapter")
    p.add_argument("--rank", nargs="+", type=int, default=None)
    p.add_argument("--dropout", nargs="+", type=float, default=None)
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="candidates (default: on a GPU those auto chooses among, triton and a "
                        "built cuda; on a CPU every backend that runs there; naming cuda "
                        "builds its extension if needed)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per backend and shape")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop starting new shapes after this long (rows so far are kept)")
    p.add_argument("--out", default=None, help="also write the rows measured now to this file")
    p.add_argument("--no-save", action="store_true", help="leave the user's table unchanged")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("tune-backends", help=__doc__.splitlines()[0],
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _candidates(op: str, device: torch.device, names: Optional[list[str]]) -> list[str]:
    if names is None:
        if device.type == "cuda":
            return _dispatch.gpu_candidates(op, device)
        names = [n for n in ("torch", "triton") if _dispatch.backend_status(n) is None]
    out = []
    for name in names:
        try:
            out.append(_dispatch.resolve_backend(op, device, name).name)
        except (_dispatch.BackendUnavailableError, ValueError) as exc:
            print(f"{op}: leaving out backend {name!r}: {exc}")
    return out


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune-backends: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    grid = GPU_GRID if device.type == "cuda" else CPU_GRID
    ops = args.op or grid["ops"]
    dtypes = args.dtype or grid["dtype"]
    ms = args.tokens or grid["m"]
    hidden = args.hidden or grid["hidden"]
    ranks = args.rank or grid["r"]
    dropouts = args.dropout if args.dropout is not None else grid["dropout"]
    name = _choice.device_name(device)
    rows: _choice.Rows = {}
    start = time.perf_counter()
    print(f"device: {name}")
    print(f"{'op':<7}{'dtype':<10}{'M':>7}{'hidden':>8}{'r':>5}{'drop':>6}  "
          f"{'ms per backend':<40}{'faster':<8}cuda/triton")
    skipped = 0
    for op in ops:
        candidates = _candidates(op, device, args.backends)
        if len(candidates) < 2:
            print(f"{op}: only {candidates or 'no backend'} can run on {device}: nothing to "
                  f"choose")
            continue
        for dtype, m, h, r, p in itertools.product(dtypes, ms, hidden, ranks, dropouts):
            if args.seconds is not None and time.perf_counter() - start > args.seconds:
                skipped += 1
                continue
            key = _choice.shape_key(op, getattr(torch, dtype), m, h, h, r, p > 0)
            try:
                result = measure(key, m, candidates, device, repeats=args.repeats)
            except torch.cuda.OutOfMemoryError:
                result = {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not result:
                print(f"{op:<7}{dtype:<10}{m:>7}{h:>8}{r:>5}{p:>6}  no backend ran this shape")
                continue
            rows[key] = result
            times = "  ".join(f"{b} {t:.3f}" for b, t in sorted(result.items()))
            best = min(result, key=result.get)
            ratio = (f"{result['cuda'] / result['triton']:.2f}"
                     if {"cuda", "triton"} <= set(result) else "-")
            print(f"{op:<7}{dtype:<10}{m:>7}{h:>8}{r:>5}{p:>6}  {times:<40}{best:<8}{ratio}",
                  flush=True)
    if skipped:
        print(f"tune-backends: {skipped} shape(s) not measured: the {args.seconds} s budget ran "
              f"out")
    if rows and not args.no_save:
        print(f"user table: {write_table(_choice.user_table_path(name), name, rows)}")
    if rows and args.out:
        print(f"rows of this run: {write_table(Path(args.out), name, rows, merge=False)}")
    _choice.reset()  # this process reads the new rows from here on
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-adapters tune-backends", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
