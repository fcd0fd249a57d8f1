"""The measured backend tables `auto` reads on a GPU: read-only, and only where they exist.

`auto` on CUDA tensors runs the triton backend, or the cuda backend for a shape where a
measured table says cuda is faster there (see `_dispatch` for the whole rule). Tables are JSON
files, one per GPU model, written by `llm-adapters tune-backends` (llm_adapters/bench/tune.py):
the user's own (`$LLM_ADAPTERS_CACHE_DIR/backend_choice/<gpu>.json`, default under
`$XDG_CACHE_HOME` or `~/.cache`, `llm_adapters/backend_choice/`) and those shipped in
`llm_adapters/ops/backend_tables/`; a user's row replaces a shipped row of the same key.
Nothing here measures, and nothing here writes a file.

A row's key: op, dtype, M rounded up to a power of two (as the Triton autotuner does), K, N,
r and whether dropout is on; its value: the median milliseconds of a training step (forward +
backward) per backend. Grad mode is not part of the key: a checkpointed layer runs its
forward without gradients and its recomputation with them, on the same backend.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import torch

from .._numerics import m_bucket

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "backend_tables"
KEY_FIELDS = ("op", "dtype", "m", "k", "n", "r", "dropout")

Rows = dict[tuple, dict[str, float]]

_lock = threading.Lock()
_tables: dict[str, Rows] = {}  # GPU model -> its rows (user rows over shipped rows)


def shape_key(op: str, dtype: torch.dtype, m: int, k: int, n: int, r: int,
              dropout: bool) -> tuple:
    """The key a table row is stored and looked up under."""
    return (op, str(dtype).removeprefix("torch."), m_bucket(m), int(k), int(n), int(r),
            bool(dropout))


def cache_dir() -> Path:
    """The folder of the user's tables (read by `auto`, written only by tune-backends)."""
    root = os.environ.get("LLM_ADAPTERS_CACHE_DIR")
    if root:
        return Path(root) / "backend_choice"
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return xdg / "llm_adapters" / "backend_choice"


def _slug(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower() or "device"


def user_table_path(device_name: str) -> Path:
    """Where the user's table for GPU model `device_name` lives."""
    return cache_dir() / f"{_slug(device_name)}.json"


def device_name(device: torch.device) -> str:
    """The name tables are kept under: the GPU model for CUDA devices, else the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def read_table(path: Path, device: str) -> Rows:
    """The rows of table file `path` for GPU model `device`. A missing file, one that cannot be
    read, rows of another device and malformed rows are skipped: a table never stops a run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    if data.get("device") != device:
        return {}
    out: Rows = {}
    for row in data.get("rows", []):
        try:
            key = shape_key(row["op"], getattr(torch, row["dtype"]), row["m"], row["k"],
                            row["n"], row["r"], row["dropout"])
            ms = {str(b): float(t) for b, t in row["ms"].items() if math.isfinite(float(t))}
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if ms:
            out[key] = ms
    return out


def rows_for(device: str) -> Rows:
    """The rows `auto` uses for GPU model `device`: shipped, then the user's over them. Read once
    per process (a table edited during a run takes effect in the next one)."""
    with _lock:
        rows = _tables.get(device)
        if rows is None:
            rows = {}
            if SHIPPED_DIR.is_dir():
                for path in sorted(SHIPPED_DIR.glob("*.json")):
                    rows.update(read_table(path, device))
            rows.update(read_table(user_table_path(device), device))
            _tables[device] = rows
        return rows


def has_rows(device: str, op: str) -> bool:
    """Whether any table row for `device` compares cuda with triton on `op`."""
    return any(key[0] == op and {"cuda", "triton"} <= set(ms)
               for key, ms in rows_for(device).items())


def cuda_is_faster(key: tuple, device: str) -> bool:
    """Whether the row for `key` on GPU model `device` has the cuda backend faster than the
    triton one. No row, or a row without both, is no: the answer is then triton."""
    ms = rows_for(device).get(key)
    return ms is not None and "cuda" in ms and "triton" in ms and ms["cuda"] < ms["triton"]


def reset() -> None:
    """Forget the tables read so far (tests, or after tune-backends wrote one)."""
    with _lock:
        _tables.clear()
