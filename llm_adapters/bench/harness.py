"""The benchmark harness shared by every op benchmark: cases, providers, and running them.

One benchmark row = one `Case` (op, mode, shape, dtype, dropout, ...) run by one `Provider`
(eager PyTorch, PEFT, the base GEMM alone, or one of our backends). For each row:

- time (`timing`): warm-up calls, then repeated calls rotating among several input sets
  (activations *and* weights, so a small shape is not timed from a warm cache), the providers
  taking turns. Median, 20th and 80th percentiles.
- memory (`memory`): on a GPU the peak allocated over one call of the mode above what was
  allocated before it; on every device the bytes the autograd graph keeps for backward.
- throughput: achieved TFLOP/s and GB/s from the op's flop count and minimum byte count
  (the counts live beside each op, written out as functions), against the device's peak when
  the device is known.
- parity (`parity`): one forward + backward on the first input set, compared with a float64
  computation of the same op from the same inputs and the same dropout keep-mask; relative
  Frobenius error of the output and of every gradient. A provider passes when each error is at
  most twice that of eager PyTorch in the same dtype plus a floor of an ulp (DESIGN §6).
- results (`results`): rows with the environment and load, the results file, table and plot.

The names of those modules are re-exported here, where the benchmarks first had them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .memory import peak_bytes, saved_bytes
from .parity import (
    PARITY_CAP,
    PARITY_CAP_EPS,
    PARITY_FLOOR_EPS,
    parity_verdict,
    provider_errors,
    rel_error,
)
from .results import (
    ROOFLINES,
    Row,
    _case_title,
    _speedups,
    append_results,
    device_name,
    device_slug,
    environment,
    format_table,
    git_commit,
    load_now,
    plot_results,
    read_results,
    results_path,
    roofline,
    roofline_fraction,
)
from .timing import Budget, quantiles, time_interleaved, time_runners

__all__ = [
    "DTYPES", "MODES", "PARITY_CAP", "PARITY_CAP_EPS", "PARITY_FLOOR_EPS", "ROOFLINES", "Budget",
    "Case", "OpRunner", "OpSpec", "Provider", "Row", "Runner", "append_results", "device_name",
    "device_slug", "environment", "format_table", "git_commit", "load_now", "parity_verdict",
    "peak_bytes", "plot_results", "provider_errors", "quantiles", "read_results", "rel_error",
    "results_path", "roofline", "roofline_fraction", "run_cases", "saved_bytes",
    "time_interleaved", "time_runners",
]

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

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


class OpRunner(Runner):
    """A runner over one input set of an op's `make_tensors` ({name: tensor}, "out_grad" the
    output gradient), with the one keep_mask() every provider shares.

    Subclasses set `grad_names` (the op's, as a staticmethod) and `dropout_input` (the name of
    the tensor dropout applies to). A provider running its own dropout passes the dropout's
    output through `dropped()`; a runner of our ops sets `seed` and `backend` instead, and its
    mask is that backend's mask for the seed (`ops.dropout_mask`).
    """

    grad_names: Callable[[Case], list[str]]
    dropout_input = "x"
    seed: Optional[int] = None
    backend: Optional[str] = None

    def __init__(self, case: Case, t: dict[str, Tensor]) -> None:
        self.case, self.t = case, t
        self.out_grad = t["out_grad"]
        self.record = False
        self._dropped: Optional[Tensor] = None

    def dropped(self, d: Tensor) -> Tensor:
        """Note what the dropout returned (while recording, for keep_mask()) and return it."""
        if self.record:
            self._dropped = d
        return d

    def grads(self) -> list[Optional[Tensor]]:
        return [self.t[n].grad for n in self.grad_names(self.case)]

    def leaves(self) -> list[Tensor]:
        return [self.t[n] for n in self.grad_names(self.case)]

    def inputs(self) -> list[Tensor]:
        return [v for k, v in self.t.items() if k != "out_grad"]

    def keep_mask(self) -> tuple[Optional[Tensor], float]:
        p = self.case.dropout
        if p == 0:
            return None, 1.0
        if self.seed is not None:
            from .. import ops
            from .._numerics import dropout_threshold

            x = self.t[self.dropout_input]
            shape = (x.numel() // x.shape[-1], x.shape[-1])
            mask = ops.dropout_mask(shape, p, self.seed, self.case.device, backend=self.backend)
            return mask, dropout_threshold(p)[1]
        if self._dropped is None:
            return None, 1.0
        # inverted dropout: a dropped element is exactly zero, a kept one x / (1 - p)
        return self._dropped != 0, 1.0 / (1.0 - p)


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
            load = load_now()  # sampled while this process sleeps, before the case is timed
            case_rows = _run_case(spec, case, providers, sets, bud, skips, errors, baseline, log)
            for row in case_rows:
                row.load = load
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
