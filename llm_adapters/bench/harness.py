"""The benchmark harness shared by every op benchmark: cases, timing, memory, parity, results.

One benchmark row = one `Case` (op, mode, shape, dtype, dropout, ...) run by one `Provider`
(eager PyTorch, PEFT, the base GEMM alone, or one of our backends). For each row:

- time: warm-up calls, then repeated calls rotating among several input sets (activations
  *and* weights, so a small shape is not timed from a warm cache). On a GPU each call is timed
  with CUDA events; on a CPU with `time.perf_counter`. Median, 20th and 80th percentiles.
- memory: on a GPU the peak of `torch.cuda.max_memory_allocated` over one call of the mode,
  above what was allocated before it (inputs and weights excluded). On every device the bytes
  the autograd graph keeps for backward, counted with `torch.autograd.graph.saved_tensors_hooks`
  over one forward: unique storages, leaving out the inputs and weights (they exist anyway),
  plus the output. On a CPU that sum is the memory column (no allocator statistics there).
- throughput: achieved TFLOP/s and GB/s from the op's flop count and minimum byte count
  (the counts live beside each op, written out as functions), against the device's peak when
  the device is known.
- parity: one forward + backward on the first input set, compared with a float64 computation
  of the same op from the same inputs and the same dropout keep-mask; relative Frobenius error
  of the output and of every gradient. A provider passes when each error is at most twice that
  of eager PyTorch in the same dtype (DESIGN §6), with a floor of a few ulps of the dtype.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Parity floor: a tolerance never below this many units of the dtype's epsilon (relative).
# Eager's own error on a tiny or degenerate shape can be near zero; a fused kernel summing in
# another order may then differ by a few ulps without being wrong. A wrong result is O(1).
PARITY_FLOOR_EPS = 1.0
# ... and never above this (relative): a baseline that went wrong must not make all pass.
PARITY_CAP_EPS = 1000.0
PARITY_CAP = 0.05

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
# Cases and providers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    op: "lora" (x [M, K] -> y [M, N]) or "series" (h [M, N] -> z [M, N], k == n);
    tokens: M; k, n: feature sizes; rank: r (the LoRA rank or the bottleneck size);
    dtype: activation / base-weight dtype name; adapter_dtype: adapter weights' dtype name
    (None: the same); x_grad: whether x (h) requires grad (False for a first layer).
    """

    op: str
    mode: str
    tokens: int
    k: int
    n: int
    rank: int
    dtype: str = "float32"
    dropout: float = 0.0
    x_grad: bool = True
    activation: str = "identity"
    scaling: float = 2.0
    bias: bool = False
    adapter_dtype: Optional[str] = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.adapter_dtype is not None and self.adapter_dtype not in DTYPES:
            raise ValueError(f"unknown adapter_dtype {self.adapter_dtype!r}")
        if min(self.tokens, self.k, self.n, self.rank) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> torch.dtype:
        return DTYPES[self.adapter_dtype or self.dtype]

    def key(self) -> tuple:
        """Everything but the mode: rows that share it share inputs and parity."""
        return tuple(v for f, v in dataclasses.asdict(self).items() if f != "mode")


class Runner:
    """A provider bound to one input set. Subclasses set `out_grad` and implement the rest."""

    out_grad: Tensor
    record: bool = False  # set for the parity call: keep what keep_mask() needs

    def forward(self) -> Tensor:
        """One training forward (autograd recording) on this set's input."""
        raise NotImplementedError

    def grads(self) -> list[Optional[Tensor]]:
        """Gradients after backward, in the op's canonical order (`OpSpec.grad_names`)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        for t in self.leaves():
            t.grad = None

    def leaves(self) -> list[Tensor]:
        """Tensors that receive .grad (set to None between calls)."""
        raise NotImplementedError

    def inputs(self) -> list[Tensor]:
        """Tensors that exist before the call (not counted as memory the call costs)."""
        raise NotImplementedError

    def keep_mask(self) -> tuple[Optional[Tensor], float]:
        """The dropout keep-mask of the last forward (2-D, bool) and the scale of kept values;
        (None, 1.0) without dropout."""
        return None, 1.0


class Provider:
    """An implementation of an op to time. `name` is what the table shows."""

    name: str = ""
    backend: Optional[str] = None
    # False when the provider computes a different function (e.g. the base GEMM alone)
    checks_parity: bool = True

    def skip_reason(self, case: Case) -> Optional[str]:
        """None when this provider can run `case` here, else why not."""
        return None

    def parity_skip_reason(self, case: Case) -> Optional[str]:
        return None if self.checks_parity else "computes a different function"

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        raise NotImplementedError

    def counts(self, spec: OpSpec, case: Case) -> tuple[float, float]:
        """(flops, minimum bytes) of one call of `case.mode`."""
        return spec.flops(case), spec.min_bytes(case)


@dataclass
class OpSpec:
    """What the harness needs to know about one op."""

    name: str
    make_tensors: Callable[[Case, int], dict[str, Tensor]]
    grad_names: Callable[[Case], list[str]]
    # float64 reference: (tensors cast to float64 with requires_grad set, mask, scale, case)
    reference: Callable[[dict[str, Tensor], Optional[Tensor], float, Case], Tensor]
    flops: Callable[[Case], float]
    min_bytes: Callable[[Case], float]
    providers: Callable[[], list[Provider]]
    baseline: str = "eager"  # the provider whose same-dtype error sets the parity tolerance


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


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    """(20th percentile, median, 80th percentile), linear interpolation between samples."""
    if not times:
        raise ValueError("no timings")
    t = torch.tensor(sorted(times), dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Times one call of `mode` on a runner: CUDA events on a GPU, perf_counter on a CPU.

    Samples are kept as event pairs on a GPU and read after one synchronisation, so timing
    does not serialise the launch queue.
    """

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.cuda = mode, device.type == "cuda"

    def __call__(self, runner: Runner, record: list) -> None:
        runner.zero_grad()
        if self.mode == "forward":
            fn: Callable[[], Any] = runner.forward
        elif self.mode == "backward":
            out = runner.forward()  # untimed: only the backward is measured
            fn = lambda: out.backward(runner.out_grad)  # noqa: E731
        else:
            fn = lambda: runner.forward().backward(runner.out_grad)  # noqa: E731
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            record.append((start, end))
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            record.append(((t1 - t0) * 1e3, (c1 - c0) * 1e3))

    def read(self, record: list) -> list[float]:
        """Milliseconds per sample (event time on a GPU, wall time on a CPU)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in record]
        return [wall for wall, _ in record]

    def read_cpu(self, record: list) -> Optional[list[float]]:
        """CPU time of this process per sample (all its threads), on a CPU device only."""
        return None if self.cuda else [cpu for _, cpu in record]


def time_interleaved(
    runners: dict[str, Sequence[Runner]],
    mode: str,
    device: torch.device,
    warmup: int,
    min_reps: int,
    max_reps: int,
    budget_s: float,
    cpu_times: Optional[dict[str, list[float]]] = None,
) -> dict[str, list[float]]:
    """Milliseconds per call of `mode` for each provider, one sample per call.

    Each provider gets `warmup` untimed calls, then the providers take turns, one call each
    per round, in an order rotated every round, each call on the next of its input sets. Taking
    turns spreads any background load (a shared CPU, clock changes) evenly over the providers
    instead of charging it to whichever ran at the wrong moment. The number of rounds is what
    fits `budget_s` per provider (estimated from the warm-up), within [min_reps, max_reps].
    In "backward" mode the forward of each call runs untimed first. On a CPU, `cpu_times` (when
    given) is filled with the process CPU time of each call: unlike wall time it does not grow
    when other processes take the cores, so it is the steadier number on a shared machine.
    """
    timer = _Timer(mode, device)
    names = list(runners)
    per_call = {}
    for name in names:
        warm: list = []
        _sync(device)
        t0 = time.perf_counter()
        for i in range(max(warmup, 1)):
            timer(runners[name][i % len(runners[name])], warm)
        _sync(device)
        wall = (time.perf_counter() - t0) / max(warmup, 1)
        # the slower of event and wall time: wall includes the untimed setup of each call
        per_call[name] = max(timer.read(warm)[-1], wall * 1e3, 1e-3) / 1e3
    slowest = max(per_call.values()) if per_call else 1.0
    reps = int(min(max(budget_s / slowest, min_reps), max_reps))
    records: dict[str, list] = {name: [] for name in names}
    for i in range(reps):
        shift = i % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            timer(runners[name][i % len(runners[name])], records[name])
    if cpu_times is not None:
        for name in names:
            cpu_times[name] = timer.read_cpu(records[name]) or []
    return {name: timer.read(records[name]) for name in names}


def time_runners(
    runners: Sequence[Runner],
    mode: str,
    device: torch.device,
    warmup: int = 1,
    min_reps: int = 5,
    max_reps: int = 50,
    budget_s: float = 1.0,
) -> list[float]:
    """Milliseconds per call of `mode` for one provider, rotating among its input sets."""
    times = time_interleaved({"_": runners}, mode, device, warmup, min_reps, max_reps, budget_s)
    return times["_"]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_bytes(runner: Runner) -> tuple[int, int]:
    """(bytes autograd keeps for backward beyond the inputs, bytes of the output) of one forward.

    Unique storages of every tensor packed by autograd during the forward, leaving out those of
    the inputs and weights (alive anyway). A view of the output counts once, with the output.
    """
    inputs = {_storage_key(t) for t in runner.inputs()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in inputs:
                saved[key] = key[1]
        return t

    runner.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = runner.forward()
    out_key = _storage_key(out)
    saved.pop(out_key, None)
    total = sum(saved.values())
    del out
    return total, out_key[1]


def peak_bytes(runner: Runner, mode: str, device: torch.device) -> Optional[int]:
    """Peak GPU memory one call of `mode` allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    runner.zero_grad()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    if mode == "forward":
        out = runner.forward()
        torch.cuda.synchronize(device)
        del out
    else:
        runner.forward().backward(runner.out_grad)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    runner.zero_grad()
    return int(peak)


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def rel_error(got: Optional[Tensor], ref: Optional[Tensor]) -> float:
    """||got - ref|| / ||ref|| in float64 (Frobenius); inf when a gradient is missing."""
    if ref is None:
        return 0.0 if got is None else math.inf
    if got is None or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    got64, ref64 = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(got64).all():
        return math.inf
    denom = ref64.norm().item()
    diff = (got64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def provider_errors(
    spec: OpSpec, case: Case, provider: Provider, tensors: dict[str, Tensor]
) -> dict[str, float]:
    """Relative errors of one forward + backward of `provider` against float64, per tensor."""
    runner = provider.build(case, tensors)
    runner.record = True  # keep what keep_mask() needs
    runner.zero_grad()
    out = runner.forward()
    out.backward(runner.out_grad)
    mask, scale = runner.keep_mask()
    grads = runner.grads()
    names = spec.grad_names(case)
    ref64 = {}
    for name, t in tensors.items():
        t64 = t.detach().to(torch.float64)
        if name in names:
            t64.requires_grad_(True)
        ref64[name] = t64
    with torch.enable_grad():
        ref_out = spec.reference(ref64, mask, scale, case)
        ref_out.backward(runner.out_grad.to(torch.float64))
    errors = {"out": rel_error(out, ref_out)}
    for name, g in zip(names, grads, strict=True):
        errors["d_" + name] = rel_error(g, ref64[name].grad)
    runner.zero_grad()
    return errors


def parity_verdict(
    errors: dict[str, float], baseline: dict[str, float], dtype: torch.dtype
) -> tuple[bool, dict[str, float]]:
    """Pass when every error is at most max(2 x the baseline's, PARITY_FLOOR_EPS ulps), and
    never above PARITY_CAP (so a broken baseline cannot make every provider pass)."""
    floor = PARITY_FLOOR_EPS * torch.finfo(dtype).eps
    cap = min(PARITY_CAP_EPS * torch.finfo(dtype).eps, PARITY_CAP)
    tol = {k: min(max(2.0 * baseline.get(k, 0.0), floor), cap) for k in errors}
    ok = all(math.isfinite(e) and e <= tol[k] for k, e in errors.items())
    return ok, tol


# --------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """How long to time each row: warm-up calls, sample count bounds, seconds of samples."""

    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    seconds: float = 1.0
    sets: int = 2  # input sets rotated among

    @staticmethod
    def for_device(device: torch.device, quick: bool = False) -> Budget:
        if quick:
            return Budget(warmup=2, min_reps=3, max_reps=5, seconds=0.02, sets=2)
        if device.type == "cuda":
            # the warm-up absorbs Triton autotuning and cuBLAS heuristics
            return Budget(warmup=5, min_reps=10, max_reps=200, seconds=0.4, sets=4)
        return Budget(warmup=1, min_reps=5, max_reps=30, seconds=1.0, sets=2)


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

    def to_dict(self, env: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "op"}
        out.update(env)
        out.update(dataclasses.asdict(self.case))
        for f in dataclasses.fields(self):
            if f.name != "case":
                out[f.name] = getattr(self, f.name)
        return out


def run_cases(
    spec: OpSpec,
    cases: Sequence[Case],
    providers: Optional[Sequence[Provider]] = None,
    budget: Optional[Budget] = None,
    log: Callable[[str], None] = lambda s: None,
    on_rows: Optional[Callable[[list[Row]], None]] = None,
) -> list[Row]:
    """Time, measure and check every provider on every case of one op.

    Cases that differ only in mode share input sets and parity results. `on_rows` is called
    with each case's rows as soon as they are measured (so a run cut short keeps them).
    """
    providers = list(spec.providers() if providers is None else providers)
    rows: list[Row] = []
    by_key: dict[tuple, list[Case]] = {}
    for case in cases:
        by_key.setdefault(case.key(), []).append(case)
    for group in by_key.values():
        first = group[0]
        device = torch.device(first.device)
        bud = budget or Budget.for_device(device)
        sets = [spec.make_tensors(first, seed) for seed in range(bud.sets)]
        skips = {p.name: p.skip_reason(first) for p in providers}
        errors, baseline = _parity_errors(spec, first, providers, sets[0], skips)
        for case in group:
            log(_case_title(case))
            case_rows = _run_case(spec, case, providers, sets, bud, skips, errors, baseline, log)
            _speedups(case_rows)
            rows.extend(case_rows)
            if on_rows is not None:
                on_rows(case_rows)
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _parity_errors(spec, case, providers, tensors, skips):
    """Errors of every runnable provider, and of the baseline (run even when not timed)."""
    errors: dict[str, dict[str, float]] = {}
    for prov in providers:
        if skips[prov.name] is not None or prov.parity_skip_reason(case) is not None:
            continue
        try:
            errors[prov.name] = provider_errors(spec, case, prov, tensors)
        except Exception as exc:  # noqa: BLE001  (reported on the row, the run goes on)
            skips[prov.name] = f"error: {type(exc).__name__}: {exc}"
    baseline = errors.get(spec.baseline)
    if baseline is None:
        base = next((p for p in spec.providers() if p.name == spec.baseline), None)
        if base is not None:
            baseline = provider_errors(spec, case, base, tensors)
    return errors, baseline


def _run_case(spec, case, providers, sets, bud, skips, errors, baseline, log) -> list[Row]:
    device = torch.device(case.device)
    peak_tflops, peak_tbps = roofline(device)
    rows = {p.name: Row(case=case, provider=p.name, backend=p.backend, status="ok")
            for p in providers}
    runners: dict[str, list[Runner]] = {}
    for prov in providers:
        row = rows[prov.name]
        reason = skips[prov.name]
        if reason is None or not reason.startswith("error"):
            reason = prov.skip_reason(case)  # may depend on the mode
        if reason is not None:
            row.status = "error" if reason.startswith("error") else "skipped"
            row.reason = reason
            continue
        try:
            runners[prov.name] = [prov.build(case, t) for t in sets]
        except Exception as exc:  # noqa: BLE001
            row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"
    cpu_times: dict[str, list[float]] = {}
    try:
        times = time_interleaved(
            runners, case.mode, device, bud.warmup, bud.min_reps, bud.max_reps, bud.seconds,
            cpu_times,
        )
    except Exception:  # noqa: BLE001  (one provider failing: time them one by one)
        times = {}
        for name, rs in runners.items():
            try:
                times[name] = time_runners(
                    rs, case.mode, device, bud.warmup, bud.min_reps, bud.max_reps, bud.seconds
                )
            except Exception as exc:  # noqa: BLE001
                rows[name].status, rows[name].reason = "error", f"{type(exc).__name__}: {exc}"
    for prov in providers:
        row = rows[prov.name]
        if prov.name not in times:
            log(f"  {prov.name:<14} {row.status}: {row.reason}")
            continue
        t = times[prov.name]
        row.p20_ms, row.time_ms, row.p80_ms = quantiles(t)
        row.reps = len(t)
        if cpu_times.get(prov.name):
            row.cpu_ms = quantiles(cpu_times[prov.name])[1]
        row.flops, row.min_bytes = prov.counts(spec, case)
        row.tflops = row.flops / (row.time_ms * 1e-3) / 1e12
        row.gbps = row.min_bytes / (row.time_ms * 1e-3) / 1e9
        row.peak_tflops, row.peak_tbps = peak_tflops, peak_tbps
        runner = runners[prov.name][0]
        row.saved_bytes, row.out_bytes = saved_bytes(runner)
        row.peak_bytes = peak_bytes(runner, case.mode, device)
        if row.peak_bytes is not None:
            row.mem_bytes, row.mem_kind = row.peak_bytes, "cuda_peak_allocated"
        else:
            row.mem_bytes = row.saved_bytes + row.out_bytes
            row.mem_kind = "saved_for_backward+output"
        why_not = prov.parity_skip_reason(case)
        if why_not is not None:
            row.parity, row.reason = "n/a", why_not
        elif prov.name in errors and baseline is not None:
            ok, tol = parity_verdict(errors[prov.name], baseline, case.torch_dtype)
            row.parity = "pass" if ok else "FAIL"
            row.parity_errors, row.parity_tol = errors[prov.name], tol
        log(
            f"  {prov.name:<14} {row.time_ms:9.3f} ms  (p20 {row.p20_ms:.3f}, "
            f"p80 {row.p80_ms:.3f}, n={row.reps})  parity {row.parity}"
        )
    return [rows[p.name] for p in providers]


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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r.status == "ok"]
    ops = sorted({r.case.op for r in ok})
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5), squeeze=False)
    for ax, op in zip(axes[0], ops, strict=False):
        op_rows = [r for r in ok if r.case.op == op]
        fields = [
            f.name for f in dataclasses.fields(Case) if f.name not in ("op", "tokens", "device")
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
