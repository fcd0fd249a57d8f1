"""`llm-adapters` command line: one subcommand per job, each defined beside the code it runs.

A subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` (called with the parsed namespace, returning an exit code). Modules are imported only
when their subcommand is used, so `llm-adapters --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module defining it
SUBCOMMANDS = {
    "demo": "llm_adapters.demo",
    "finetune": "llm_adapters.train",
    "evaluate": "llm_adapters.evaluate",
    "bench": "llm_adapters.bench.cli",
    "tune-backends": "llm_adapters.bench.tune",
    "check": "llm_adapters.selfcheck",
}


def _normalise_flags(argv: list[str]) -> list[str]:
    """Accept LLM-Adapters' underscore spelling (--lora_r) as well as dashes (--lora-r)."""
    out = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            flag, *rest = arg.split("=", 1)
            arg = "=".join([flag.replace("_", "-"), *rest])
        out.append(arg)
    return out


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-adapters", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(run `llm-adapters {name} --help`)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = _normalise_flags(list(sys.argv[1:] if argv is None else argv))
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only=command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
