"""Summarise a results folder (what `benchmarks/gpu_check.sh` leaves): test counts, parity,
the fastest of our backends per case, and DESIGN §7's GPU targets against what was measured.

    python -m llm_adapters.bench.summary OUT_DIR

Exit status 1 when a test failed, a provider failed parity or errored, else 0. Targets that
are missed are reported, not failed: they are goals, not correctness.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any, Optional

from .results import read_results

# DESIGN §7 (H100, bf16, M = 8192, K = N = 4096, r = 16)
TARGET_CASE = dict(tokens=8192, k=4096, n=4096, rank=16, dtype="bfloat16")


def junit_counts(path: str) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for key in out:
            out[key] += int(s.get(key, 0) or 0)
    return out


def _best_ours(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    ours = [r for r in rows if r["provider"].startswith("ours-") and r["status"] == "ok"]
    return min(ours, key=lambda r: r["time_ms"]) if ours else None


def _group(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    keys = ("op", "mode", "tokens", "k", "n", "rank", "dtype", "dropout", "x_grad", "activation")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def _time(rows, name) -> Optional[float]:
    for r in rows:
        if r["provider"] == name and r["status"] == "ok":
            return r["time_ms"]
    return None


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def summarise(out_dir: str, printer=print) -> int:
    status = 0
    for path in sorted(glob.glob(os.path.join(out_dir, "*.xml"))):
        c = junit_counts(path)
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        printer(f"tests ({os.path.basename(path)}): {passed} passed, {c['failures']} failed, "
                f"{c['errors']} errors, {c['skipped']} skipped"
                + (" (all skipped: did pytest see a GPU?)" if c["tests"] and not passed else ""))
        if c["failures"] or c["errors"]:
            status = 1
    records: list[dict[str, Any]] = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*.jsonl"))):
        records.extend(read_results(path))
    ops_rows = [r for r in records if r.get("kind") == "op"]
    e2e_rows = [r for r in records if r.get("kind") == "e2e"]
    if ops_rows:
        bad = [r for r in ops_rows if r.get("parity") == "FAIL" or r.get("status") == "error"]
        printer(f"op rows: {len(ops_rows)}, parity failures or errors: {len(bad)}")
        for r in bad:
            printer(f"  {r['provider']} {r['op']} {r['mode']} M={r['tokens']} p={r['dropout']}: "
                    f"{r.get('parity')} {r.get('reason') or ''}")
        if bad:
            status = 1
        printer(f"{'op':<7}{'mode':<9}{'M':>6}{'K':>6}{'N':>6}{'r':>4}{'p':>6}  "
                f"{'best ours':<12}{'ms':>9}{'vs eager':>9}{'vs peft':>8}{'/gemm':>8}")
        for key, rows in _group(ops_rows).items():
            best = _best_ours(rows)
            if best is None:
                continue
            t = best["time_ms"]
            printer(f"{key[0]:<7}{key[1]:<9}{key[2]:>6}{key[3]:>6}{key[4]:>6}{key[5]:>4}"
                    f"{key[7]:>6}  {best['provider']:<12}{t:>9.3f}"
                    f"{_ratio(_time(rows, 'eager'), t):>9}{_ratio(_time(rows, 'peft'), t):>8}"
                    f"{_ratio(t, _time(rows, 'gemm')):>8}")
        printer("(vs eager / vs peft: their time over ours; /gemm: ours over the base GEMM's)")
    targets = _targets(ops_rows, e2e_rows)
    if targets:
        printer("DESIGN §7 targets (H100, bf16, M=8192, K=N=4096, r=16):")
        for line in targets:
            printer("  " + line)
    if e2e_rows:
        printer(f"{'e2e':<9}{'impl':<7}{'tok/s':>10}{'weights GiB':>12}{'peak GiB':>10}"
                f"{'speedup':>9}{'mem ratio':>10}{'max|dloss|':>12}")
        for r in e2e_rows:
            if r.get("status") != "ok":
                printer(f"{r['variant']:<9}{r['impl']:<7} {r.get('status')}: {r.get('reason')}")
                status = 1
                continue
            peak = "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f}"
            wb = r.get("weights_bytes")  # rows written before it was recorded have none
            weights = "-" if wb is None else f"{wb / 2**30:.3f}"
            sp = "-" if r.get("speedup") is None else f"{r['speedup']:.2f}x"
            mr = "-" if r.get("mem_ratio") is None else f"{r['mem_ratio']:.2f}"
            dl = "-" if r.get("loss_max_abs_diff") is None else f"{r['loss_max_abs_diff']:.2e}"
            printer(f"{r['variant']:<9}{r['impl']:<7}{r['tokens_per_s']:>10.0f}{weights:>12}"
                    f"{peak:>10}{sp:>9}{mr:>10}{dl:>12}")
    tuned = _backend_table(os.path.join(out_dir, "backend_table.json"), printer)
    kernels = _kernel_bandwidth(os.path.join(out_dir, "kernels-bandwidth.json"), printer)
    if not ops_rows and not e2e_rows and not tuned and not kernels:
        printer(f"no benchmark results in {out_dir}")
    return status


def _kernel_bandwidth(path: str, printer) -> bool:
    """Print the fastest variant of each skinny kernel per M from `llm_adapters.bench.kernels`,
    and the check that shrink and expand reach 70% of the peak bandwidth for M >= 512."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        rows = json.load(f)
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["kernel"], r["m"], r["k"], r["r"], r["dtype"])
        if key not in best or r["gbps"] > best[key]["gbps"]:
            best[key] = r
    device = rows[0]["device"] if rows else "?"
    printer(f"kernel bandwidth ({os.path.basename(path)}, {device}), fastest variant:")
    printer(f"{'kernel':<12}{'M':>7}{'K':>6}{'r':>4}  {'variant':<13}{'ms':>9}{'GB/s':>9}"
            f"{'% peak':>8}")
    for key, r in sorted(best.items()):
        pct = "-" if r["pct_peak"] is None else f"{r['pct_peak']:.1f}"
        printer(f"{key[0]:<12}{key[1]:>7}{key[2]:>6}{key[3]:>4}  {r['variant']:<13}"
                f"{r['ms']:>9.4f}{r['gbps']:>9.1f}{pct:>8}")
    target = [r for (kernel, m, *_), r in best.items()
              if kernel in ("shrink", "expand") and m >= 512 and r["pct_peak"] is not None]
    if target:
        worst = min(target, key=lambda r: r["pct_peak"])
        printer(f"shrink / expand at M >= 512: lowest {worst['pct_peak']:.1f}% of peak "
                f"({worst['kernel']}, M={worst['m']}; target >= 70%) "
                + ("met" if worst["pct_peak"] >= 70 else "MISSED"))
    return True


def _backend_table(path: str, printer) -> bool:
    """Print the rows of a `tune-backends --out` table: the faster backend per shape, and the
    check that the cuda backend is at least as fast as the triton one up to M = 1024."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        data = json.load(f)
    rows = data.get("rows", [])
    printer(f"backend table ({os.path.basename(path)}, {data.get('device')}): {len(rows)} shapes")
    printer(f"{'op':<7}{'dtype':<10}{'M':>7}{'K':>6}{'r':>4}{'drop':>6}  {'faster':<8}"
            f"{'cuda/triton':>12}")
    small = []
    for r in rows:
        ms = r["ms"]
        ratio = ms["cuda"] / ms["triton"] if {"cuda", "triton"} <= set(ms) else None
        if ratio is not None and r["m"] <= 1024:
            small.append(ratio)
        printer(f"{r['op']:<7}{r['dtype']:<10}{r['m']:>7}{r['k']:>6}{r['r']:>4}"
                f"{str(r['dropout']):>6}  {min(ms, key=ms.get):<8}"
                f"{'-' if ratio is None else f'{ratio:.2f}':>12}")
    if small:
        worst = max(small)
        printer(f"cuda vs triton at M <= 1024: worst time ratio {worst:.2f} (target <= 1.00) "
                + ("met" if worst <= 1.0 else "MISSED"))
    return True


def _targets(ops_rows, e2e_rows) -> list[str]:
    out = []

    def case_rows(op: str, mode: str, dropout: float = 0.0):
        for rows in _group(ops_rows).values():
            r0 = rows[0]
            if (r0["op"], r0["mode"], r0["dropout"]) != (op, mode, dropout):
                continue
            if all(r0.get(k) == v for k, v in TARGET_CASE.items() if not (op == "series" and
                                                                          k == "rank")):
                return rows
        return None

    def line(label, value, goal, better_low):
        if value is None:
            return f"{label}: not measured"
        ok = value <= goal if better_low else value >= goal
        return f"{label}: {value:.2f} (target {'<=' if better_low else '>='} {goal}) " + (
            "met" if ok else "MISSED")

    rows = case_rows("lora", "forward")
    if rows:
        best = _best_ours(rows)
        gemm = _time(rows, "gemm")
        out.append(line("LoRA forward / base GEMM", best["time_ms"] / gemm if best and gemm
                        else None, 1.08, True))
    rows = case_rows("lora", "full")
    if rows:
        best, peft = _best_ours(rows), _time(rows, "peft")
        out.append(line("LoRA fwd+bwd speedup vs PEFT", peft / best["time_ms"] if best and peft
                        else None, 1.35, False))
    rows = case_rows("series", "full")
    if rows:
        best, eager = _best_ours(rows), _time(rows, "eager")
        out.append(line("series fwd+bwd speedup vs eager", eager / best["time_ms"]
                        if best and eager else None, 2.5, False))
    lora_e2e = [r for r in e2e_rows if r.get("variant") == "lora" and r.get("impl") == "ours"
                and r.get("status") == "ok" and r.get("device_type") == "cuda"]
    if lora_e2e:
        r = lora_e2e[-1]
        out.append(line("e2e LoRA tokens/s vs PEFT", r.get("speedup"), 1.25, False))
        if r.get("peak_bytes") is not None:
            out.append(line("e2e LoRA peak memory vs PEFT", r.get("mem_ratio"), 0.85, True))
    return out


def markdown(records: list[dict[str, Any]]) -> str:
    """The op rows of one run as a Markdown table (for benchmarks/README.md)."""
    lines = [
        "| case | provider | median ms (p20–p80) | CPU ms | mem MiB | vs eager | vs PEFT "
        "| vs PEFT, CPU time | parity |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def case_of(r: dict[str, Any]) -> str:
        return (f"{r['op']} {r['mode']} M={r['tokens']} K={r['k']} N={r['n']} r={r['rank']} "
                f"{r['dtype']} p={r['dropout']} x_grad={'yes' if r['x_grad'] else 'no'}")

    peft_cpu_by_case = {case_of(r): r.get("cpu_ms") for r in records
                        if r.get("kind") == "op" and r.get("provider") == "peft"
                        and r.get("status") == "ok"}
    for r in records:
        if r.get("kind") != "op" or r.get("status") != "ok":
            continue
        case = case_of(r)
        cpu = "-" if r.get("cpu_ms") is None else f"{r['cpu_ms']:.0f}"
        mem = "-" if r.get("mem_bytes") is None else f"{r['mem_bytes'] / 2**20:.1f}"
        ve = "-" if r.get("speedup_vs_eager") is None else f"{r['speedup_vs_eager']:.2f}x"
        vp = "-" if r.get("speedup_vs_peft") is None else f"{r['speedup_vs_peft']:.2f}x"
        peft_cpu = peft_cpu_by_case.get(case)
        vpc = "-" if not (peft_cpu and r.get("cpu_ms")) else f"{peft_cpu / r['cpu_ms']:.2f}x"
        lines.append(f"| {case} | {r['provider']} | {r['time_ms']:.1f} ({r['p20_ms']:.1f}–"
                     f"{r['p80_ms']:.1f}) | {cpu} | {mem} | {ve} | {vp} | {vpc} "
                     f"| {r.get('parity')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[0] == "--markdown":  # --markdown RESULTS.jsonl DATE
        recs = [r for r in read_results(argv[1]) if r.get("date") == argv[2]]
        print(markdown(recs))
        return 0
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print("usage: python -m llm_adapters.bench.summary OUT_DIR\n"
              "       python -m llm_adapters.bench.summary --markdown RESULTS.jsonl DATE",
              file=sys.stderr)
        return 2
    return summarise(argv[0])


if __name__ == "__main__":
    sys.exit(main())
