"""`llm-adapters bench`: the op benchmarks (and optionally the end-to-end one) on this device.

Runs each op at sizes chosen for the device present, prints a table (time per provider,
speedup vs eager and vs PEFT, parity), appends every row to
`<out>/<device>.jsonl` and draws `<out>/<device>.png` (time vs tokens, one panel per op).
Exit status 1 when any provider fails parity or errors, else 0.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from typing import Any, Optional

import torch

from . import harness, results
from .harness import Case
from .timing import Budget

OPS = ("lora", "series")

# Sizes per device. CPU: the LoRA layer of the README's CPU figure (fp32, M=4096,
# K=N=1024, r=16); it finishes in about a minute on two idle cores. GPU: DESIGN §7's target
# shape (K=N=4096, r=16, bf16) at two token counts, and the series adapter at LLaMA-7B width.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "lora": dict(tokens=[4096], kn=[(1024, 1024)], rank=[16], dtype="float32",
                     dropout=[0.0, 0.05], x_grad=[True, False], mode=["full"]),
        "series": dict(tokens=[1024, 4096], kn=[(1024, 1024)], rank=[64], dtype="float32",
                       dropout=[0.0], x_grad=[True], mode=["full"]),
    },
    "cuda": {
        "lora": dict(tokens=[2048, 8192], kn=[(4096, 4096)], rank=[16], dtype="bfloat16",
                     dropout=[0.0, 0.05], x_grad=[True], mode=["forward", "full"]),
        "series": dict(tokens=[2048, 8192], kn=[(4096, 4096)], rank=[256], dtype="bfloat16",
                       dropout=[0.0], x_grad=[True], mode=["forward", "full"]),
    },
    # tiny odd sizes: seconds, for the test suite and smoke checks
    "quick": {
        "lora": dict(tokens=[67, 130], kn=[(72, 88)], rank=[8], dtype="float32",
                     dropout=[0.0, 0.1], x_grad=[True], mode=["full"]),
        "series": dict(tokens=[67, 130], kn=[(80, 80)], rank=[12], dtype="float32",
                       dropout=[0.0, 0.1], x_grad=[True], mode=["full"]),
    },
}

# DESIGN §7's grid (GPU): LLaMA / Mistral projection shapes, M from 512 to 16384.
_LLAMA_KN = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "design": {
        "lora": dict(tokens=[512, 2048, 8192, 16384], kn=_LLAMA_KN, rank=[8, 16, 64],
                     dtype="bfloat16", dropout=[0.0, 0.05], x_grad=[True],
                     mode=["forward", "backward", "full"]),
        "series": dict(tokens=[512, 2048, 8192, 16384], kn=[(h, h) for h in (4096, 5120, 8192)],
                       rank=[64, 256], dtype="bfloat16", dropout=[0.0], x_grad=[True],
                       mode=["forward", "backward", "full"]),
    },
}


def _kn(text: str) -> tuple[int, int]:
    """'4096' -> (4096, 4096); '4096x11008' -> (K=4096, N=11008)."""
    parts = text.lower().split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or KxN, got {text!r}") from None
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"expected H or KxN, got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op to time")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:i] (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts M")
    p.add_argument("--hidden", type=_kn, nargs="+", metavar="H|KxN",
                   help="feature sizes: H (K=N=H) or KxN (LoRA in x out; series needs K=N)")
    p.add_argument("--rank", type=int, nargs="+", help="LoRA rank / bottleneck size")
    p.add_argument("--dtype", choices=list(harness.DTYPES), help="activation dtype")
    p.add_argument("--adapter-dtype", choices=list(harness.DTYPES), default=None,
                   help="adapter weight dtype (default: the activation dtype)")
    p.add_argument("--dropout", type=float, nargs="+", help="dropout probabilities")
    p.add_argument("--x-grad", choices=["yes", "no", "both"], default=None,
                   help="whether the input requires grad (no: a first layer)")
    p.add_argument("--mode", choices=[*harness.MODES, "all"], nargs="+", help="timed region")
    p.add_argument("--activation", default=None,
                   help="branch activation (default: identity for lora, tanh for series)")
    p.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                   help="our backends to time: torch, triton, cuda, all (default: all that run "
                        "here; Triton's CPU interpreter only when named)")
    p.add_argument("--providers", nargs="+", default=None, metavar="NAME",
                   help="limit to these providers (eager, peft, gemm, adapterhub, ours-torch...)")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="a named size grid (design: DESIGN §7's full GPU grid)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="folder for <device>.jsonl and <device>.png")
    p.add_argument("--results-file", default=None, metavar="PATH",
                   help="append rows to this .jsonl instead of <out>/<device>.jsonl (the plots "
                        "are named after it)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-write", action="store_true", help="do not append to the results file")
    p.add_argument("--seconds", type=float, default=None, help="timing budget per provider")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds in all")
    p.add_argument("--e2e", action="store_true", help="also run the end-to-end benchmark")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end benchmark")
    from .e2e import add_arguments as add_e2e_arguments

    add_e2e_arguments(p)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="benchmark the adapter ops (and training) on this device",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _device(args: argparse.Namespace) -> torch.device:
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backends(args: argparse.Namespace) -> tuple[list[str], bool]:
    """Backend names to time, and whether Triton's CPU interpreter may be timed."""
    from .. import ops

    names = args.backend or ["all"]
    if "all" in names:
        return list(ops.BACKENDS), False
    for n in names:
        if n not in ops.BACKENDS:
            raise SystemExit(f"unknown backend {n!r}: expected {', '.join(ops.BACKENDS)} or all")
    return names, True  # asked for by name: run it, even under the interpreter


def build_cases(op: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases of one op: defaults for the device (or preset), overridden by the flags."""
    if args.quick:
        base = DEFAULTS["quick"][op]
    elif args.preset:
        base = PRESETS[args.preset][op]
    else:
        base = DEFAULTS["cuda" if device.type == "cuda" else "cpu"][op]
    kn = args.hidden or base["kn"]
    if op == "series":
        bad = [f"{k}x{n}" for k, n in kn if k != n]
        if bad:
            raise SystemExit(f"the series adapter maps N to N: --hidden {' '.join(bad)} has K != N")
    modes = args.mode or base["mode"]
    if "all" in modes:
        modes = list(harness.MODES)
    x_grad = {"yes": [True], "no": [False], "both": [True, False]}.get(args.x_grad or "", None)
    activation = args.activation or ("identity" if op == "lora" else "tanh")
    scaling = 2.0 if op == "lora" else 1.0
    cases = []
    grid = itertools.product(
        args.dropout or base["dropout"], x_grad or base["x_grad"], kn, args.rank or base["rank"],
        args.tokens or base["tokens"], modes,
    )
    for p, xg, (k, n), r, m, mode in grid:
        cases.append(Case(
            op=op, mode=mode, tokens=m, k=k, n=n, rank=r, dtype=args.dtype or base["dtype"],
            dropout=p, x_grad=xg, activation=activation, scaling=scaling,
            adapter_dtype=args.adapter_dtype, device=str(device),
        ))
    return cases


def _providers(op: str, args: argparse.Namespace) -> list[harness.Provider]:
    from . import lora, series

    backends, interp = _backends(args)
    module = lora if op == "lora" else series
    provs = module.providers(backends=backends, allow_interpreter=interp)
    if args.providers:
        provs = [p for p in provs if p.name in args.providers]
        if not provs:
            raise SystemExit(f"no provider of {op} is named in --providers {args.providers}")
    return provs


def _spec(op: str) -> harness.OpSpec:
    from . import lora, series

    return lora.SPEC if op == "lora" else series.SPEC


def _command(args: argparse.Namespace) -> str:
    """The flags that were set, as a command line (for the results rows)."""
    out = []
    for key, val in sorted(vars(args).items()):
        if key in ("func", "command") or val is None or val is False:
            continue
        flag = "--" + key.replace("_", "-")
        if val is True:
            out.append(flag)
        elif isinstance(val, list):
            vals = ["x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in val]
            out.append(flag + " " + " ".join(vals))
        else:
            out.append(f"{flag} {val}")
    return " ".join(out)


def run(args: argparse.Namespace, argv: Optional[list[str]] = None) -> int:
    """Run the benchmarks described by `args`; returns the exit status."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no CUDA device is available")
    env = results.environment(device)
    env["command"] = "llm-adapters bench " + (
        " ".join(shlex.quote(a) for a in argv) if argv is not None else _command(args)
    )
    print(f"device: {env['device_name']}  torch {env['torch']}  triton {env['triton']}  "
          f"transformers {env['transformers']}  peft {env['peft']}  commit {env['git_commit']}")
    if device.type == "cpu":
        print(f"cpu threads: {env['threads']}  load average (1 min): {env['load_avg_1min']}")
    budget = Budget.for_device(device, quick=args.quick)
    if args.seconds is not None:
        budget.seconds = args.seconds
    status = 0
    all_rows: list[results.Row] = []
    ops_to_run = [] if args.e2e_only else (list(OPS) if args.op == "all" else [args.op])
    t0 = time.perf_counter()
    path = args.results_file or results.results_path(args.out, device)

    def write(rows: list[results.Row]) -> None:  # per case: a run cut short keeps its rows
        if not args.no_write:
            results.append_results(path, [r.to_dict(env) for r in rows])

    for op in ops_to_run:
        cases = build_cases(op, args, device)
        print(f"\n== {op}: {len(cases)} case(s) ==", flush=True)
        rows = harness.run_cases(_spec(op), cases, _providers(op, args), budget,
                                 log=lambda s: print(s, flush=True), on_rows=write)
        all_rows.extend(rows)
    if all_rows:
        print("\n" + results.format_table(all_rows))
        bad = [r for r in all_rows if r.parity == "FAIL" or r.status == "error"]
        if bad:
            status = 1
            print(f"\n{len(bad)} row(s) failed parity or errored: "
                  + ", ".join(f"{r.provider}@{r.case.op}/{r.case.mode}/M={r.case.tokens}"
                              for r in bad))
        if not args.no_write:
            print(f"\nresults appended to {path}")
        if not args.no_plot:
            png = results.plot_results(
                all_rows, os.path.splitext(path)[0] + ".png",
                title=f"{env['device_name']} | torch {env['torch']} | {env['date']}",
            )
            print(f"plot: {png}" if png else "plot: skipped (matplotlib is not installed)")
    print(f"op benchmarks took {time.perf_counter() - t0:.1f} s")
    if args.e2e or args.e2e_only:
        from . import e2e

        status = max(status, e2e.run_from_args(args, device, env))
    return status


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point for the benchmark scripts: `main(["--op", "lora", ...])`."""
    parser = argparse.ArgumentParser(prog="llm-adapters bench", description=__doc__)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(parser.parse_args(argv), argv)
