"""`llm-adapters tune-backends`: measure which backend is faster per shape on this GPU.

Times a training step (forward + backward) of each op with every backend that can run it (the
measurement `auto` otherwise makes on first use of a shape, see llm_adapters/ops/_choice.py)
over a grid of shapes, prints the winner per shape with the cuda / triton time ratio, and adds
the rows to the user's table (read by `auto` in every later process). `--out FILE` also writes
the rows measured now as a table file of the shipped format, ready to be placed in
llm_adapters/ops/backend_tables/.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..ops import _choice, _dispatch

GPU_GRID = dict(ops=["lora", "series"], dtype=["bfloat16"], m=[128, 512, 1024, 2048, 4096,
                8192, 16384], hidden=[4096], r=[16, 64], dropout=[0.0, 0.05])
CPU_GRID = dict(ops=["lora", "series"], dtype=["float32"], m=[64, 1024], hidden=[256], r=[16],
                dropout=[0.0])


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
                   help="candidates (default: those auto would choose among; naming cuda "
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
        return _dispatch.auto_candidates(op, device)
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
    table = _choice.table_for(name)
    fresh = _choice.Table(name)  # the rows of this run, for --out
    start = time.perf_counter()
    print(f"device: {name}")
    print(f"{'op':<7}{'dtype':<10}{'M':>7}{'hidden':>8}{'r':>5}{'drop':>6}  "
          f"{'ms per backend':<40}{'faster':<8}cuda/triton")
    measured = skipped = 0
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
                result = _choice.measure(key, m, candidates, device, repeats=args.repeats)
            except torch.cuda.OutOfMemoryError:
                result = {}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not result:
                print(f"{op:<7}{dtype:<10}{m:>7}{h:>8}{r:>5}{p:>6}  no backend ran this shape")
                continue
            measured += 1
            table.add(key, result, user=True)
            fresh.add(key, result, user=True)
            times = "  ".join(f"{b} {t:.3f}" for b, t in sorted(result.items()))
            best = min(result, key=result.get)
            ratio = (f"{result['cuda'] / result['triton']:.2f}"
                     if {"cuda", "triton"} <= set(result) else "-")
            print(f"{op:<7}{dtype:<10}{m:>7}{h:>8}{r:>5}{p:>6}  {times:<40}{best:<8}{ratio}",
                  flush=True)
    if skipped:
        print(f"tune-backends: {skipped} shape(s) not measured: the {args.seconds} s budget ran "
              f"out")
    if measured and not args.no_save:
        print(f"user table: {_choice.save_user_table(table)}")
    if measured and args.out:
        print(f"rows of this run: {_choice.save_user_table(fresh, Path(args.out))}")
    _choice.reset()  # choices made before this run in the process follow the new rows
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-adapters tune-backends", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
