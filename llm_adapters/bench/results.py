"""Results of the benchmarks: the environment and load of a run, rows, the results file, the
table and the plot.

Every row carries `environment()` (what ran, where, when) and, when the machine's load can be
described (`bench/load.py`), the load just before its case was measured (`load_now()`): a CPU
timing means little without the load it was taken under.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from .harness import Case

# Dense peak (TFLOP/s for 16-bit tensor-core math, TB/s of HBM) for roofline fractions.
# Matched by substring of torch.cuda.get_device_name(); vendor data sheets, dense (no sparsity).
ROOFLINES = (
    ("H200", 989.0, 4.8),
    ("H100 PCIe", 756.0, 2.0),
    ("H100", 989.0, 3.35),
    ("A100-SXM4-80GB", 312.0, 2.039),
    ("A100", 312.0, 1.555),
    ("L40S", 362.0, 0.864),
    ("A10G", 125.0, 0.6),
)



# --------------------------------------------------------------------------------------------
# Device and environment
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe name of the device, used to name its results file."""
    name = device_name(device).lower()
    if device.type == "cpu":
        name = re.sub(r"\(r\)|\(tm\)|cpu|@.*?ghz|processor", " ", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{device.type}-{slug}"[:80]


def roofline(device: torch.device) -> tuple[Optional[float], Optional[float]]:
    """(peak TFLOP/s, peak TB/s) for a known GPU, else (None, None)."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, tflops, tbps in ROOFLINES:
        if key in name:
            return tflops, tbps
    return None, None


def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001  (any import failure means "not usable here")
        return None
    return getattr(mod, "__version__", None)


def git_commit() -> Optional[str]:
    """The commit of the checkout this package runs from ("+dirty" when modified), or None."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Written on every results row: what ran, where, when."""
    return {
        "device_name": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "torch_cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_python": platform.python_version(),
    }


# seconds load_now() samples the machine for: short, it runs before every case
LOAD_WINDOW_S = 0.2


def load_now(window_s: float = LOAD_WINDOW_S) -> Optional[dict[str, Any]]:
    """The machine's load (`bench.load.describe_load`), or None where it cannot be described."""
    try:
        from .load import describe_load
    except ImportError:
        return None
    try:
        return describe_load(window_s=window_s)
    except Exception:  # noqa: BLE001  (a missing /proc entry must not stop a benchmark)
        return None


@dataclass
class Row:
    """One results row (flattened into the results file)."""

    case: Case
    provider: str
    backend: Optional[str]
    status: str  # "ok" | "skipped" | "error"
    reason: Optional[str] = None
    time_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: int = 0
    cpu_ms: Optional[float] = None  # median process CPU time per call (CPU devices)
    flops: Optional[float] = None
    min_bytes: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_tflops: Optional[float] = None
    peak_tbps: Optional[float] = None
    saved_bytes: Optional[int] = None
    out_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    mem_bytes: Optional[int] = None
    mem_kind: Optional[str] = None
    parity: Optional[str] = None  # "pass" | "FAIL" | "n/a"
    parity_errors: dict[str, float] = field(default_factory=dict)
    parity_tol: dict[str, float] = field(default_factory=dict)
    speedup_vs_eager: Optional[float] = None
    speedup_vs_peft: Optional[float] = None
    # the same ratios of process CPU time (CPU devices): steadier on a shared machine
    cpu_speedup_vs_eager: Optional[float] = None
    cpu_speedup_vs_peft: Optional[float] = None
    load: Optional[dict[str, Any]] = None  # load_now() before the case was measured

    def to_dict(self, env: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "op"}
        out.update(env)
        out.update(dataclasses.asdict(self.case))
        for f in dataclasses.fields(self):
            if f.name != "case":
                out[f.name] = getattr(self, f.name)
        return out





def _case_title(c: Case) -> str:
    return (
        f"{c.op} {c.mode}: M={c.tokens} K={c.k} N={c.n} r={c.rank} {c.dtype} "
        f"p={c.dropout} x_grad={c.x_grad} act={c.activation} [{c.device}]"
    )


def _speedups(rows: list[Row]) -> None:
    times = {r.provider: r.time_ms for r in rows if r.status == "ok"}
    cpu = {r.provider: r.cpu_ms for r in rows if r.status == "ok" and r.cpu_ms}
    for r in rows:
        if r.status != "ok":
            continue
        if times.get("eager"):
            r.speedup_vs_eager = times["eager"] / r.time_ms
        if times.get("peft"):
            r.speedup_vs_peft = times["peft"] / r.time_ms
        if r.cpu_ms and cpu.get("peft"):
            r.cpu_speedup_vs_peft = cpu["peft"] / r.cpu_ms
        if r.cpu_ms and cpu.get("eager"):
            r.cpu_speedup_vs_eager = cpu["eager"] / r.cpu_ms


# --------------------------------------------------------------------------------------------
# Results file, table and plot
# --------------------------------------------------------------------------------------------


def results_path(out_dir: str, device: torch.device) -> str:
    return os.path.join(out_dir, device_slug(device) + ".jsonl")


def append_results(path: str, records: Sequence[dict[str, Any]]) -> None:
    """Append records as JSON lines (one object per line; NaN/inf written as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(_jsonable(rec), sort_keys=True) + "\n")


def read_results(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def roofline_fraction(r: Row) -> Optional[float]:
    """Fraction of the binding roofline reached: the larger of compute and bandwidth use."""
    if r.peak_tflops is None or r.tflops is None or r.gbps is None or not r.peak_tbps:
        return None
    return max(r.tflops / r.peak_tflops, r.gbps / (r.peak_tbps * 1e3))


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: one block per case, one line per provider."""
    lines = []
    cpu = any(r.cpu_ms is not None for r in rows)
    roof = any(r.peak_tflops is not None for r in rows)
    head = (
        f"{'provider':<14} {'median ms':>10} {'p20-p80 ms':>17} "
        + (f"{'cpu ms':>9} " if cpu else "")
        + f"{'TFLOP/s':>8} {'GB/s':>7} "
        + (f"{'roof%':>6} " if roof else "")
        + f"{'mem MiB':>8} {'vs eager':>8} {'vs peft':>8} "
        + (f"{'peft cpu':>8} " if cpu else "")
        + " parity"
    )
    last_case = None
    for r in rows:
        if r.case != last_case:
            c = r.case
            lines.append("")
            lines.append(_case_title(c))
            lines.append(head)
            last_case = c
        if r.status != "ok":
            lines.append(f"{r.provider:<14} {r.status}: {r.reason}")
            continue
        mem = None if r.mem_bytes is None else r.mem_bytes / 2**20
        spread = f"{r.p20_ms:.3f}-{r.p80_ms:.3f}"
        speed_e = _fmt(r.speedup_vs_eager, ".2f") + ("x" if r.speedup_vs_eager else "")
        speed_p = _fmt(r.speedup_vs_peft, ".2f") + ("x" if r.speedup_vs_peft else "")
        parity = r.parity or "-"
        if r.parity == "FAIL":
            worst = max(r.parity_errors, key=lambda k: r.parity_errors[k] / r.parity_tol[k])
            parity += f" ({worst} err {r.parity_errors[worst]:.2e} > tol {r.parity_tol[worst]:.2e})"
        cpu_col = f"{_fmt(r.cpu_ms, '.3f'):>9} " if cpu else ""
        roof_col = f"{_fmt(roofline_fraction(r), '.1%'):>6} " if roof else ""
        lines.append(
            f"{r.provider:<14} {r.time_ms:>10.3f} {spread:>17} {cpu_col}{_fmt(r.tflops, '.2f'):>8} "
            f"{_fmt(r.gbps, '.1f'):>7} {roof_col}{_fmt(mem, '.1f'):>8} {speed_e:>8} {speed_p:>8} "
            + (f"{_fmt(r.cpu_speedup_vs_peft, '.2f') + ('x' if r.cpu_speedup_vs_peft else ''):>8} "
               if cpu else "")
            + f" {parity}"
        )
    return "\n".join(lines).lstrip("\n")


def plot_results(rows: Sequence[Row], path: str, title: str = "") -> Optional[str]:
    """Time vs tokens per provider, one panel per op; returns the path (None without matplotlib).

    Each line is one provider at one configuration; configuration fields that vary within the
    run (other than tokens) are named in the legend.
    """
    plt = pyplot()
    if plt is None:
        return None
    ok = [r for r in rows if r.status == "ok"]
    ops = sorted({r.case.op for r in ok})
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=False):
        op_rows = [r for r in ok if r.case.op == op]
        fields = [
            f.name for f in dataclasses.fields(op_rows[0].case)
            if f.name not in ("op", "tokens", "device")
        ]
        varying = [f for f in fields if len({getattr(r.case, f) for r in op_rows}) > 1]
        lines: dict[tuple, list[tuple[int, float, float, float]]] = {}
        for r in op_rows:
            key = (r.provider, *(getattr(r.case, f) for f in varying))
            lines.setdefault(key, []).append((r.case.tokens, r.time_ms, r.p20_ms, r.p80_ms))
        for key, pts in sorted(lines.items(), key=lambda kv: str(kv[0])):
            pts.sort()
            label = key[0] + "".join(f" {f}={v}" for f, v in zip(varying, key[1:], strict=True))
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", label=label)
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], alpha=0.15)
        c = op_rows[0].case
        fixed = f"K={c.k} N={c.n} r={c.rank} {c.dtype}" if op == "lora" else (
            f"hidden={c.n} bottleneck={c.rank} {c.dtype}"
        )
        ax.set_title(f"{op}: {fixed}")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("time per call (ms, median; band p20-p80)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)

def pyplot() -> Any:
    """matplotlib.pyplot with the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, path: str) -> str:
    """Write `fig` to `path` (its folder created), close it, return the path."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_ab_json(path: str, device: str, rows: list[dict[str, Any]],
                  load: Optional[dict[str, Any]]) -> None:
    """The rows of an A/B script under benchmarks/ with the machine, versions, date and the
    load before and after the runs."""
    meta = {
        **environment(torch.device(device)),
        "cpu": platform.processor() or platform.machine(),
        "load": load, "load_after": load_now(),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
