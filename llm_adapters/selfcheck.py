"""`llm-adapters check`: every backend that loads on this machine, checked against float64.

For each backend that can run here (torch everywhere; triton on a GPU, or on CPU under the
Triton interpreter; cuda when the extension is built or cached), each op — LoRA and a parallel
adapter (`ops.lora_linear`, the latter with a non-linearity, branch biases and a learned scale)
and the series adapter (`ops.series_adapter`) — runs forward and backward at a few shapes (odd
ones among them; with `--model PATH` the shapes of that model's adapted layers, read from its
config.json) in bfloat16, float16 and float32. Its output and every gradient are compared with
the same computation in float64 on the same inputs and the backend's own dropout keep-mask
(`ops.dropout_mask`), and each fwd+bwd call is timed. One table, one exit status (0 = all pass).

The bound is DESIGN §6's parity rule, as the benchmarks apply it (`bench.parity.parity_verdict`):
a result may be off float64 by at most twice what eager PyTorch in the same dtype is off (its
error measured here, on the same inputs and mask) plus one epsilon of the dtype, and never more
than min(1000 eps, 0.05), so a baseline gone wrong cannot make everything pass. Errors are
relative Frobenius norms, per tensor (a gradient that is a sum over rows — a bias's, the
learned scale's — relative to the magnitude of its terms: `reduction_magnitudes`). The
references are `bench.parity`'s, written with torch's own functions, not the package's.

`llm-adapters check --aot [ARGS]` runs the ahead-of-time compile check of the Triton kernels
instead (`llm_adapters.triton_kernels.aot`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from ._numerics import dropout_threshold
from .bench import parity
from .bench.parity import lora_reference, rel_error, series_reference

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
OPS = ("lora", "parallel", "series")
PARALLEL_ACTIVATION = "tanh"  # LLM-Adapters' default (reduction_magnitudes assumes it)
SERIES_ACTIVATION = "tanh"
SEED = 1234  # the dropout seed; inputs come from their own generator (see _inputs)


@dataclass(frozen=True)
class Case:
    """One op at one shape. For the series adapter k == n (its width)."""

    op: str  # lora | parallel | series
    m: int
    k: int
    n: int
    r: int
    dropout: float
    layer: str = ""  # the model layer these shapes come from (--model), else ""

    def label(self) -> str:
        shape = f"{self.m}x{self.n}" if self.op == "series" else f"{self.m}x{self.k}->{self.n}"
        text = f"{shape} r{self.r}" + (f" p{self.dropout:g}" if self.dropout else "")
        return f"{self.layer} {text}" if self.layer else text


# Small and odd on a CPU (the Triton interpreter runs every block in numpy): M not a multiple
# of any block, r = 1 and 12, K and N not powers of two.
CPU_SHAPES = ((37, 48, 40, 12, 0.1), (20, 33, 72, 1, 0.0))
# On a GPU: odd M and widths at moderate sizes, then LLaMA-7B's widths.
GPU_SHAPES = ((1023, 1000, 1536, 12, 0.1), (2049, 4096, 11008, 16, 0.0))
SERIES_RANKS_GPU = (64, 256)  # bottleneck sizes: LLM-Adapters' default is 256


def default_cases(device: torch.device) -> list[Case]:
    """The built-in shapes for `device`: each op at two shapes, dropout on at one of them."""
    cases = []
    if device.type == "cuda":
        for (m, k, n, r, p), rs in zip(GPU_SHAPES, SERIES_RANKS_GPU):
            cases += [Case("lora", m, k, n, r, p), Case("parallel", m, k, n, rs, p),
                      Case("series", m, k, k, rs, p)]
    else:
        for m, k, n, r, p in CPU_SHAPES:
            cases += [Case("lora", m, k, n, r, p), Case("parallel", m, k, n, r, p),
                      Case("series", m, n, n, r, p)]
    return sorted(cases, key=lambda c: OPS.index(c.op))


# --------------------------------------------------------------------------------------------
# Shapes of a local Hugging Face model (config.json only)
# --------------------------------------------------------------------------------------------


def _first(cfg: dict, *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def read_model_config(path: str) -> dict:
    """The parsed config.json of the model folder `path` (or `path` itself if it is a file).
    A multimodal config's text part (`text_config`) is used when the top level has no width."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"--model {path}: no config.json there (expected {file})")
    with open(file, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ValueError(f"{file} is not a Hugging Face model config (it has no model_type)")
    if _first(cfg, "hidden_size", "n_embd", "n_embed", "d_model") is None and isinstance(
        cfg.get("text_config"), dict
    ):
        cfg = {"model_type": cfg["model_type"], **cfg["text_config"]}
    return cfg


def layer_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """in_features, out_features of each projection the families in our target table adapt,
    from the config's widths (hidden size, heads, key/value heads, head dim, MLP width)."""
    mt = cfg["model_type"]
    hidden = _first(cfg, "hidden_size", "n_embd", "n_embed", "d_model")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"config of model type {mt!r} has no hidden size (hidden_size / n_embd)")
    heads = int(_first(cfg, "num_attention_heads", "n_head", "num_heads", default=1))
    kv_heads = int(_first(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=hidden // max(heads, 1)))
    inter = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size",
                       default=4 * hidden))
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    if mt == "falcon":
        if cfg.get("new_decoder_architecture"):
            qkv = (heads + 2 * kv_heads) * head_dim
        elif cfg.get("multi_query", True):
            qkv = hidden + 2 * head_dim
        else:
            qkv = 3 * hidden
    elif mt == "phi3":
        qkv = q_out + 2 * kv_out
    else:  # bloom, gpt_neox, gpt2: one fused [q; k; v] of the hidden width each
        qkv = 3 * hidden
    return {
        "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden), "qkv_proj": (hidden, qkv), "query_key_value": (hidden, qkv),
        "c_attn": (hidden, qkv),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
        "gate_up_proj": (hidden, 2 * inter),
        "dense_h_to_4h": (hidden, inter), "dense_4h_to_h": (inter, hidden),
        "fc_in": (hidden, inter), "fc_out": (inter, hidden),
        "fc1": (hidden, inter), "fc2": (inter, hidden),
        "c_fc": (hidden, inter), "c_proj": (inter, hidden),
    }


def model_cases(path: str, tokens: int, rank: int, bottleneck: int) -> list[Case]:
    """The cases for the layers a model's family adapts by default (our target table): LoRA
    on the LoRA targets (dropout 0.05), the parallel adapter on the parallel targets and the
    series adapter on the series targets, at the width of the side it sits on (dropout 0)."""
    from .models import INPUT_SIDE, TARGET_MODULES  # re-exported by the models package

    cfg = read_model_config(path)
    mt = cfg["model_type"]
    if mt not in TARGET_MODULES:
        raise ValueError(
            f"--model {path}: no default target modules for model type {mt!r} "
            f"(families with defaults: {', '.join(sorted(TARGET_MODULES))})"
        )
    shapes = layer_shapes(cfg)
    plan = (("lora", rank, 0.05), ("parallel", bottleneck, 0.0), ("series", bottleneck, 0.0))
    cases: list[Case] = []
    seen: set[tuple] = set()
    for op, r, p in plan:
        for target in TARGET_MODULES[mt][op]:
            name = target.rsplit(".", 1)[-1]
            if name not in shapes:
                raise ValueError(f"model type {mt!r}: no shape rule for target module {name!r}")
            k, n = shapes[name]
            if op == "series":
                k = n = k if name in INPUT_SIDE else n
            case = Case(op, tokens, k, n, r, p, layer=target)
            if (op, k, n) not in seen:  # q_proj and v_proj often share a shape
                seen.add((op, k, n))
                cases.append(case)
    return cases


# --------------------------------------------------------------------------------------------
# The op, its eager same-dtype form, and the float64 reference
# --------------------------------------------------------------------------------------------


def eager(case: Case, t: dict[str, Tensor], keep: Optional[Tensor], inv_keep: float) -> Tensor:
    """The op written plainly in PyTorch (`bench.parity`), in the dtype of `t`: the same-dtype
    baseline, and with float64 leaves the reference."""
    if case.op == "series":
        return series_reference(t["h"], t["down"], t["up"], scaling=t["scale"],
                                activation=SERIES_ACTIVATION, keep=keep, inv_keep=inv_keep)
    if case.op == "lora":
        return lora_reference(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                              scaling=2.0, keep=keep, inv_keep=inv_keep)
    return lora_reference(t["x"], t["weight"], None, t["lora_a"], t["lora_b"],
                          scaling=t["scale"], activation=PARALLEL_ACTIVATION, keep=keep,
                          inv_keep=inv_keep, lora_a_bias=t["lora_a_bias"],
                          lora_b_bias=t["lora_b_bias"])


def run_ops(case: Case, t: dict[str, Tensor], backend: str) -> Tensor:
    """The op through `llm_adapters.ops` on `backend`."""
    from . import ops

    p = case.dropout
    if case.op == "series":
        return ops.series_adapter(t["h"], t["down"], t["up"], scaling=1.0,
                                  activation=SERIES_ACTIVATION, dropout_p=p, seed=SEED,
                                  backend=backend)
    if case.op == "lora":
        return ops.lora_linear(t["x"], t["weight"], t["bias"], t["lora_a"], t["lora_b"],
                               scaling=2.0, dropout_p=p, seed=SEED, backend=backend)
    return ops.lora_linear(t["x"], t["weight"], None, t["lora_a"], t["lora_b"],
                           scaling=t["scale"], dropout_p=p, activation=PARALLEL_ACTIVATION,
                           seed=SEED, lora_a_bias=t["lora_a_bias"],
                           lora_b_bias=t["lora_b_bias"], backend=backend)


# name -> (shape, scale of the values, trainable); the base weight is frozen (DESIGN §2.1)
def _specs(case: Case) -> dict[str, tuple[tuple[int, ...], float, bool]]:
    m, k, n, r = case.m, case.k, case.n, case.r
    if case.op == "series":
        return {"h": ((m, n), 1.0, True), "down": ((r, n), n ** -0.5, True),
                "up": ((n, r), r ** -0.5, True), "scale": ((), 1.0, False),
                "grad": ((m, n), 1.0, False)}
    specs = {"x": ((m, k), 1.0, True), "weight": ((n, k), k ** -0.5, False),
             "lora_a": ((r, k), k ** -0.5, True), "lora_b": ((n, r), r ** -0.5, True),
             "grad": ((m, n), 1.0, False)}
    if case.op == "lora":
        specs["bias"] = ((n,), 0.1, True)  # a trainable base bias (PEFT's bias="all")
    else:
        specs.update({"lora_a_bias": ((r,), 0.1, True), "lora_b_bias": ((n,), 0.1, True),
                      "scale": ((), 1.0, True)})
    return specs


def _inputs(case: Case, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Random inputs, already rounded to `dtype`, from a generator seeded by the case (so every
    backend and dtype of a case sees the same values before rounding). Drawn on `device`: on
    a CPU a LLaMA-sized weight takes a large part of a second to draw, per row."""
    gen = torch.Generator(device=device)
    gen.manual_seed(zlib.crc32(f"{case.op} {case.label()}".encode()))
    out = {}
    for name, (shape, scale, _) in _specs(case).items():
        if name == "scale":
            v = torch.tensor(0.5 if case.op == "parallel" else 1.0, device=device)
        else:
            v = torch.randn(shape, generator=gen, device=device) * scale
        out[name] = v.to(dtype)
    return out


def _leaves(case: Case, base: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    specs = _specs(case)
    out = {}
    for name, v in base.items():
        c = v.detach().to(dtype).clone()
        out[name] = c.requires_grad_(specs[name][2])
    return out


def _trainable(case: Case) -> list[str]:
    return [name for name, (_, _, train) in _specs(case).items() if train]


def reduction_magnitudes(case: Case, t: dict[str, Tensor], g: Tensor, keep: Optional[Tensor],
                         inv_keep: float) -> dict[str, float]:
    """For the gradients that are sums over rows (the biases', the learned scale's): the
    Frobenius norm of the sums of their terms' magnitudes, from the float64 leaves `t`.

    Summation error grows with the terms, not with their sum: a scalar such as d(scale), a sum
    of M·N terms of either sign, can cancel to a small value that no dtype computes to a few
    of its epsilons. Its error is therefore measured against this magnitude (as the tests'
    assert_parity does), for ours and for eager alike; the rule then applies unchanged."""
    out: dict[str, float] = {}
    with torch.no_grad():
        g_abs = g.abs().sum(0).norm().item()
        if case.op == "lora":
            out["d_bias"] = g_abs
        elif case.op == "parallel":
            out["d_lora_b_bias"] = g_abs
            x = t["x"] if keep is None else t["x"] * keep.to(t["x"].dtype) * inv_keep
            s = x @ t["lora_a"].t() + t["lora_a_bias"]
            h = torch.tanh(s)  # PARALLEL_ACTIVATION
            out["d_scale"] = (g * (h @ t["lora_b"].t())).abs().sum().item()
            ds = t["scale"] * (g @ t["lora_b"]) * (1.0 - h * h)
            out["d_lora_a_bias"] = ds.abs().sum(0).norm().item()
    return out


def _error(got: Optional[Tensor], ref: Tensor, magnitude: Optional[float]) -> float:
    """rel_error, or ||got - ref|| / magnitude when a magnitude is given."""
    if magnitude is None:
        return rel_error(got, ref)
    err = rel_error(got, ref)  # inf when missing, misshapen or not finite
    if not math.isfinite(err):
        return err
    diff = (got.detach().to(torch.float64) - ref.detach()).norm().item()
    return diff / magnitude if magnitude > 0 else diff


def _fwd_bwd(fn: Callable[[dict], Tensor], t: dict[str, Tensor], grad: Tensor):
    for v in t.values():
        v.grad = None
    out = fn(t)
    out.backward(grad)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    backend: str
    op: str
    dtype: str
    shape: str = "*"
    status: str = "pass"  # pass | FAIL | ERROR | skip
    error: Optional[float] = None  # of the tensor nearest its bound (largest error / bound)
    bound: Optional[float] = None
    worst: str = ""  # that tensor: out, d_x, d_lora_a, ...
    ms: Optional[float] = None  # fwd+bwd, median
    eager_ms: Optional[float] = None
    reason: str = ""
    errors: dict[str, float] = field(default_factory=dict)  # per tensor: ours vs float64
    eager_errors: dict[str, float] = field(default_factory=dict)  # eager, same dtype, vs float64
    bounds: dict[str, float] = field(default_factory=dict)


def check_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device,
               reps: int = 5) -> Row:
    """One backend, op, shape and dtype: errors of the output and every gradient against
    float64, the bound from eager PyTorch's error in the same dtype, and fwd+bwd times."""
    from . import ops

    dname = str(dtype).replace("torch.", "")
    row = Row(backend, _op_name(case.op), dname, case.label())
    base = _inputs(case, dtype, device)
    grad = base.pop("grad")
    ours = _leaves(case, base, dtype)
    out = _fwd_bwd(lambda t: run_ops(case, t, backend), ours, grad)
    keep, inv_keep = None, 1.0
    if case.dropout > 0:
        width = case.n if case.op == "series" else case.k
        keep = ops.dropout_mask((case.m, width), case.dropout, SEED, device, backend=backend)
        inv_keep = dropout_threshold(case.dropout)[1]
    same = _leaves(case, base, dtype)
    out_same = _fwd_bwd(lambda t: eager(case, t, keep, inv_keep), same, grad)
    ref = _leaves(case, base, torch.float64)
    out_ref = _fwd_bwd(lambda t: eager(case, t, keep, inv_keep), ref, grad.double())
    names = ["out", *("d_" + n for n in _trainable(case))]
    got = [out, *(ours[n[2:]].grad for n in names[1:])]
    base_got = [out_same, *(same[n[2:]].grad for n in names[1:])]
    want = [out_ref, *(ref[n[2:]].grad for n in names[1:])]
    mags = reduction_magnitudes(case, ref, grad.double(), keep, inv_keep)
    for name, g, e, w in zip(names, got, base_got, want):
        row.errors[name] = _error(g, w, mags.get(name))
        row.eager_errors[name] = _error(e, w, mags.get(name))
    ok, row.bounds = parity.parity_verdict(row.errors, row.eager_errors, dtype)
    ratio = -1.0
    for name, err in row.errors.items():
        r = err / row.bounds[name] if math.isfinite(err) else math.inf
        if r > ratio:
            ratio, row.error, row.bound, row.worst = r, err, row.bounds[name], name
    row.status = "pass" if ok else "FAIL"
    if reps > 0:
        row.ms = _median_ms(lambda: _fwd_bwd(lambda t: run_ops(case, t, backend), ours, grad),
                            reps, device)
        row.eager_ms = _median_ms(
            lambda: _fwd_bwd(lambda t: eager(case, t, keep, inv_keep), same, grad), reps, device
        )
    return row


def _op_name(op: str) -> str:
    if op == "parallel":
        return f"parallel({PARALLEL_ACTIVATION})"
    if op == "series":
        return f"series({SERIES_ACTIVATION})"
    return op


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def interpreter_on(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def backend_skip_reason(name: str, device: torch.device, build_cuda: bool) -> Optional[str]:
    """None when backend `name` can run on `device` without a long build, else why not."""
    from . import ops

    if name == "cuda" and device.type != "cuda":  # decided without loading the extension
        return f"the CUDA kernels run CUDA tensors only (this check runs on {device.type})"
    if name == "cuda" and not build_cuda:
        # a JIT build of the extension takes minutes: only when asked for (--build-cuda)
        from .ops import cuda_backend

        if not cuda_backend.ready_without_compile():
            return ("the extension is not built and not in the JIT cache; --build-cuda builds "
                    "it now (minutes), or LLM_ADAPTERS_BUILD_CUDA=1 pip install -e .")
    try:
        ops.resolve_backend(None, device, name)
    except (ops.BackendUnavailableError, ValueError) as exc:
        return str(exc)
    return None


def dtype_skip_reason(name: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why backend `name` does not run `dtype` on `device`, or None."""
    if name == "triton" and dtype == torch.bfloat16 and interpreter_on(device):
        return "the Triton CPU interpreter cannot run bf16 tl.dot (Triton issue 11584)"
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16"
    return None


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

_COLUMNS = ("backend", "op", "dtype", "shape", "max rel err", "bound", "worst", "result",
            "ms", "eager ms")


def _fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) else format(v, spec))


def _cells(row: Row) -> list[str]:
    return [row.backend, row.op, row.dtype, row.shape, _fmt(row.error, ".1e"),
            _fmt(row.bound, ".1e"), row.worst or "-", row.status, _fmt(row.ms, ".2f"),
            _fmt(row.eager_ms, ".2f")]


class Table:
    """Prints rows as they come (a run cut short by a timeout keeps what it measured), in
    fixed columns; skip and error reasons follow their row."""

    widths = (7, 14, 8, 30, 11, 7, 13, 6, 9, 9)

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.rows: list[Row] = []

    def _line(self, cells: Sequence[str]) -> None:
        text = "  ".join(c.ljust(w) for c, w in zip(cells, self.widths)).rstrip()
        print(text, file=self.stream, flush=True)

    def header(self) -> None:
        self._line(_COLUMNS)
        self._line(["-" * w for w in self.widths])

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self._line(_cells(row))
        if row.reason:
            print(f"{'':9}{row.status}: {row.reason}", file=self.stream, flush=True)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        env["sm"] = f"sm_{cap[0]}{cap[1]}"
    else:
        import platform

        env["device"] = platform.processor() or platform.machine()
    triton = sys.modules.get("triton")
    env["triton"] = getattr(triton, "__version__", None) if triton else None
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    env["LLM_ADAPTERS_TRITON_AUTOTUNE"] = os.environ.get("LLM_ADAPTERS_TRITON_AUTOTUNE", "")
    return env


def run_check(
    cases: Sequence[Case],
    backends: Sequence[str],
    dtypes: Sequence[str],
    device: torch.device,
    reps: Optional[int] = None,
    build_cuda: bool = False,
    stream=None,
    on_row: Optional[Callable[[list[Row]], None]] = None,
) -> list[Row]:
    """Check every (backend, case, dtype) and print one table; returns its rows. `reps`:
    timed calls per row (default 5 on a GPU, 3 on a CPU, 1 under the Triton interpreter).
    `on_row(rows)` is called after each row (to keep what was measured if the run is cut)."""
    table = Table(stream)
    add = table.add
    if on_row is not None:
        def add(row: Row) -> None:
            table.add(row)
            on_row(table.rows)

    table.header()
    for name in backends:
        why = backend_skip_reason(name, device, build_cuda)
        if why is not None:
            add(Row(name, "*", "*", status="skip", reason=why))
            continue
        n_reps = reps
        if n_reps is None:
            n_reps = 5 if device.type == "cuda" else 3
            if name == "triton" and interpreter_on(device):
                n_reps = 1  # its times mean nothing; a call costs a second there
        for dname in dtypes:
            dtype = DTYPES[dname]
            why = dtype_skip_reason(name, dtype, device)
            if why is not None:
                add(Row(name, "*", dname, status="skip", reason=why))
                continue
            for case in cases:
                try:
                    row = check_case(case, name, dtype, device, n_reps)
                except Exception as exc:  # noqa: BLE001 - a crash is a result to report
                    row = Row(name, _op_name(case.op), dname, case.label(), status="ERROR",
                              reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                add(row)
    return table.rows


def _summary(rows: Sequence[Row]) -> tuple[int, str]:
    counts = {s: sum(r.status == s for r in rows) for s in ("pass", "FAIL", "ERROR", "skip")}
    ran = counts["pass"] + counts["FAIL"] + counts["ERROR"]
    ok = ran > 0 and counts["FAIL"] == 0 and counts["ERROR"] == 0
    text = (f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors, "
            f"{counts['skip']} skipped: {'OK' if ok else 'NOT OK'}")
    return (0 if ok else 1), text


def _run_aot(argv: list[str]) -> int:
    try:
        aot = importlib.import_module("llm_adapters.triton_kernels.aot")
    except ModuleNotFoundError as exc:
        print(f"llm-adapters check --aot: the ahead-of-time compile check is not available "
              f"here ({exc}); it needs llm_adapters.triton_kernels.aot and Triton",
              file=sys.stderr)
        return 2
    return int(aot.main(argv) or 0)


def _device(arg: Optional[str]) -> torch.device:
    device = torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("llm-adapters check: --device cuda, but torch sees no GPU")
    if device.type not in ("cuda", "cpu"):
        raise SystemExit(f"llm-adapters check: unsupported device {device} (cpu or cuda)")
    return device


def run(args: argparse.Namespace) -> int:
    """The `check` subcommand."""
    if args.aot is not None:
        return _run_aot(list(args.aot))
    device = _device(args.device)
    notes = []
    if (device.type == "cpu" and "triton" in args.backends and "triton" not in sys.modules
            and "TRITON_INTERPRET" not in os.environ):
        # Triton reads it once, at import: the only way its kernels run on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
        notes.append("triton: CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 "
                     "set by this check; numerics only, its times mean nothing)")
    if args.model:
        tokens = args.tokens or (1023 if device.type == "cuda" else 33)
        cases = model_cases(args.model, tokens, args.rank, args.bottleneck)
        if args.ops:
            cases = [c for c in cases if c.op in args.ops]
    else:
        cases = [c for c in default_cases(device) if not args.ops or c.op in args.ops]
        if args.tokens:
            cases = [Case(c.op, args.tokens, c.k, c.n, c.r, c.dropout) for c in cases]
    env = _environment(device)
    autotune = os.environ.get("LLM_ADAPTERS_TRITON_AUTOTUNE", "1") != "0"
    print(f"llm-adapters check on {env['device']} ({device.type}), torch {torch.__version__}")
    if device.type == "cuda" and "triton" in args.backends:
        notes.append("triton configs: " + (
            "autotuned (a first run compiles and times every candidate; "
            "LLM_ADAPTERS_TRITON_AUTOTUNE=0 takes one config)" if autotune
            else "one untimed config each (LLM_ADAPTERS_TRITON_AUTOTUNE=0)"))
    for note in notes:
        print(note)
    print(f"bound: 2 x eager PyTorch's error in the same dtype + {parity.PARITY_FLOOR_EPS:g} "
          f"eps, at most min({parity.PARITY_CAP_EPS:g} eps, {parity.PARITY_CAP:g}); "
          "errors: relative Frobenius vs float64, the tensor nearest its bound shown; "
          "ms: fwd+bwd, median of " + (f"{args.reps}" if args.reps is not None else
                                       "5 on a GPU, 3 on a CPU, 1 in the Triton interpreter"))
    print()
    def save(rows: list[Row], status: Optional[int] = None, summary: str = "incomplete"):
        if args.json:
            env.update(_environment(device))  # triton's version is known once it is imported
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"environment": env, "status": status, "summary": summary,
                           "rows": [asdict(r) for r in rows]}, f, indent=1)

    t0 = time.perf_counter()
    rows = run_check(cases, args.backends, args.dtypes, device, args.reps, args.build_cuda,
                     on_row=save)
    code, text = _summary(rows)
    print(f"\n{text} ({time.perf_counter() - t0:.1f} s)")
    save(rows, code, text)
    return code


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .ops import BACKENDS

    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   metavar="NAME", help="backends to check (default: all that load here)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES),
                   metavar="DTYPE", help="bfloat16 float16 float32 (default: all)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=None, metavar="OP",
                   help="lora parallel series (default: all)")
    p.add_argument("--model", metavar="PATH",
                   help="a local Hugging Face model folder: check at the shapes of the layers "
                        "its family adapts by default (read from config.json only)")
    p.add_argument("--tokens", type=int, default=None, metavar="M",
                   help="rows (tokens) per call (default: the built-in shapes' own; with "
                        "--model 1023 on a GPU, 33 on a CPU)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank with --model (default 8)")
    p.add_argument("--bottleneck", type=int, default=256,
                   help="parallel / series bottleneck size with --model (default 256)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed fwd+bwd calls per row, median shown (default 5 on a GPU, 3 on "
                        "a CPU; 0 skips timing)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--build-cuda", action="store_true",
                   help="JIT-build the CUDA extension if it is not built (takes minutes)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and environment here")
    p.add_argument("--aot", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
                   help="run the ahead-of-time compile check of the Triton kernels instead "
                        "(llm_adapters.triton_kernels.aot), passing it ARGS")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("check", help=__doc__.splitlines()[0], description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p
