"""`auto` on a GPU: the backend that was measured fastest for this op, shape and GPU model.

Where more than one backend can run an op on a CUDA device, `auto` does not rank them by a
fixed rule: which of the Triton and CUDA kernels is faster depends on the GPU, the dtype and
the shape (launch-bound at small M, bandwidth-bound at large M). The choice is made from timed
forward + backward passes, in this order:

1. a measured row for this GPU model and this shape key, from the user's table
   (`$LLM_ADAPTERS_CACHE_DIR/backend_choice/`, default `~/.cache/llm_adapters/...`) or one
   shipped with the package (`llm_adapters/ops/backend_tables/`);
2. else, in eager mode and unless `LLM_ADAPTERS_AUTO_MEASURE=0`, a measurement made now: each
   candidate runs the op at this shape on random data (a private generator: the caller's RNG
   streams are untouched), best of a few warm repeats; the row is added to the user's table,
   so the next process reads it instead of measuring;
3. else (while torch.compile traces, while a CUDA graph is captured, or with measuring off)
   the nearest measured row for this GPU model, op and dtype (distance in log2 of M, K, N, r);
4. else the fixed order triton, cuda, torch.

Shape key: op, dtype, M rounded up to a power of two (as the Triton autotuner does), K, N, r
and whether dropout is on; what is timed is a training step's forward + backward. Grad mode is
deliberately not part of the key: a checkpointed layer runs its forward without gradients and
its recomputation with them, and both must take the same backend (the torch backend's dropout
mask is not the GPU kernels' one). `llm-adapters tune-backends` measures
a grid of keys ahead of time and writes the same table.

Candidates are the backends that load and run the op on the device, with one exception: the
`cuda` backend takes part only when its extension is already loaded or was built ahead of time
(`LLM_ADAPTERS_BUILD_CUDA=1 pip install`): `auto` never starts a multi-minute JIT compile.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

from .._numerics import m_bucket

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "backend_tables"
DEFAULT_ORDER = ("triton", "cuda", "torch")
_MEASURED_DEVICE_TYPES = {"cuda"}  # tests add "cpu" to exercise the machinery without a GPU

_lock = threading.RLock()
_tables: dict[str, Table] = {}  # device name -> merged table (user rows over shipped rows)
_choices: dict[tuple, str] = {}  # (device name, shape key, candidates) -> backend name


def shape_key(op: str, dtype: torch.dtype, m: int, k: int, n: int, r: int,
              dropout: bool) -> tuple:
    """The key a choice is made and stored under."""
    return (op, str(dtype).removeprefix("torch."), m_bucket(m), int(k), int(n), int(r),
            bool(dropout))


_KEY_FIELDS = ("op", "dtype", "m", "k", "n", "r", "dropout")


def cache_dir() -> Path:
    root = os.environ.get("LLM_ADAPTERS_CACHE_DIR")
    if root:
        return Path(root) / "backend_choice"
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return xdg / "llm_adapters" / "backend_choice"


def _slug(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"


def user_table_path(device_name: str) -> Path:
    return cache_dir() / f"{_slug(device_name)}.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class Table:
    """Measured rows for one GPU model: key -> {backend: median ms}."""

    def __init__(self, device: str):
        self.device = device
        self.rows: dict[tuple, dict[str, float]] = {}
        self.user_rows: dict[tuple, dict[str, float]] = {}
        self.meta: dict[str, Any] = {}

    def add(self, key: tuple, ms: dict[str, float], user: bool) -> None:
        merged = {**self.rows.get(key, {}), **ms}
        self.rows[key] = merged
        if user:
            self.user_rows[key] = {**self.user_rows.get(key, {}), **ms}

    def exact(self, key: tuple) -> Optional[dict[str, float]]:
        return self.rows.get(key)

    def nearest(self, key: tuple) -> Optional[dict[str, float]]:
        """The row of the same op and dtype closest in log2 (M, K, N, r), preferring rows with
        the same dropout flag."""
        best, best_d = None, math.inf
        for other, ms in self.rows.items():
            if other[:2] != key[:2]:
                continue
            d = sum(abs(math.log2(a / b)) for a, b in zip(key[2:6], other[2:6]))
            d += 0.5 * (other[6] != key[6])
            if d < best_d:
                best, best_d = ms, d
        return best


def _parse(path: Path, device: str) -> Iterable[tuple[tuple, dict[str, float]]]:
    """The rows of a table file for `device`; a file that cannot be read is skipped (a broken
    cache must never stop training), rows of other devices are ignored."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return []
    if data.get("device") != device:
        return []
    out = []
    for row in data.get("rows", []):
        try:
            key = shape_key(row["op"], getattr(torch, row["dtype"]), row["m"], row["k"],
                            row["n"], row["r"], row["dropout"])
            ms = {str(b): float(t) for b, t in row["ms"].items() if math.isfinite(float(t))}
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if ms:
            out.append((key, ms))
    return out


def table_for(device: str) -> Table:
    """The merged table for GPU model `device` (shipped rows, then the user's over them)."""
    with _lock:
        table = _tables.get(device)
        if table is None:
            table = Table(device)
            if SHIPPED_DIR.is_dir():
                for path in sorted(SHIPPED_DIR.glob("*.json")):
                    for key, ms in _parse(path, device):
                        table.add(key, ms, user=False)
            for key, ms in _parse(user_table_path(device), device):
                table.add(key, ms, user=True)
            _tables[device] = table
        return table


def save_user_table(table: Table, path: Optional[Path] = None) -> Path:
    """Write the table's user rows (atomically: a concurrent reader sees old or new, whole).
    Rows another process added to the file meanwhile (the ranks of a multi-GPU job measure at
    the same time) are kept, unless this table measured the same key."""
    shared = path is None
    path = path or user_table_path(table.device)
    if shared:
        for key, ms in _parse(path, table.device):
            if key not in table.user_rows:
                table.add(key, ms, user=True)
    rows = [
        {**dict(zip(_KEY_FIELDS, key)), "ms": {b: round(t, 5) for b, t in sorted(ms.items())}}
        for key, ms in sorted(table.user_rows.items())
    ]
    data = {
        "format": FORMAT,
        "device": table.device,
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
        "rows": rows,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:  # one row per line: diffs of a shipped table stay readable
        head = json.dumps({k: v for k, v in data.items() if k != "rows"}, indent=1)
        f.write(head[:-2] + ',\n "rows": [\n')
        f.write(",\n".join("  " + json.dumps(row) for row in rows))
        f.write("\n ]\n}\n")
    os.replace(tmp, path)
    return path


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


def reset() -> None:
    """Forget loaded tables and made choices (tests, or after editing a table by hand)."""
    with _lock:
        _tables.clear()
        _choices.clear()


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
    from . import lora_linear, series_adapter  # the public ops, with an explicit backend

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
                    f"llm_adapters auto: backend {name!r} failed at {key} and is left out of "
                    f"the choice: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
                continue
            results[name] = min(ms, results.get(name, math.inf))
    return results


def _can_measure(device: torch.device) -> bool:
    if os.environ.get("LLM_ADAPTERS_AUTO_MEASURE", "1").strip() == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _in_clean_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on a new thread, waited for. The caller may be inside a checkpointed forward
    or its recomputation (saved-tensor hooks that would capture the measurement's tensors),
    under no_grad, inference_mode or autocast: all of that state is per thread, and a new
    thread starts without it."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            device = args[-1]
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the current device is per thread too
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=run, name="llm_adapters-measure", daemon=True)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def choose(key: tuple, m: int, candidates: list[str], device: torch.device,
           measure_fn: Callable[..., dict[str, float]] = measure) -> str:
    """The backend among `candidates` to run `key` with (see the module docstring)."""
    if len(candidates) == 1:
        return candidates[0]
    name = device_name(device)
    memo = (name, key, tuple(candidates))
    with _lock:
        if memo in _choices:
            return _choices[memo]
        table = table_for(name)
        row = table.exact(key)
        complete = row is not None and all(c in row for c in candidates)
        if not complete and _can_measure(device):
            try:
                measured = _in_clean_thread(measure_fn, key, m, candidates, device)
            except torch.cuda.OutOfMemoryError:
                measured = {}
            if measured:
                table.add(key, measured, user=True)
                try:
                    save_user_table(table)
                except OSError:
                    pass  # a read-only home: the choice still holds for this process
                row = table.exact(key)
        if row is None or not any(c in row for c in candidates):
            row = table.nearest(key)
        timed = [c for c in candidates if row is not None and c in row]
        if timed:
            choice = min(timed, key=lambda c: row[c])
        else:
            choice = next(c for c in DEFAULT_ORDER + tuple(candidates) if c in candidates)
        _choices[memo] = choice
        return choice


def applies_to(device: torch.device) -> bool:
    return device.type in _MEASURED_DEVICE_TYPES
