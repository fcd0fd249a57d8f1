"""Memory a benchmark call costs: saved-for-backward bytes (every device), GPU peak (CUDA).

- `saved_bytes`: the bytes the autograd graph keeps for backward over one forward, counted
  with `torch.autograd.graph.saved_tensors_hooks`: unique storages, leaving out the tensors
  that exist anyway (inputs and weights). On a CPU this is the memory column (no allocator
  statistics there).
- `CudaPeak` / `peak_bytes`: the peak of `torch.cuda.max_memory_allocated` during a block,
  above what was allocated when it began.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .harness import Runner


def _storage_key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_storages(forward: Callable[[], Any], exclude: Iterable[Tensor]) -> tuple[Any, dict]:
    """Run `forward` under saved-tensor hooks: (its result, {storage key: bytes} of every
    strided tensor autograd packed, leaving out the storages of `exclude`)."""
    skip = {_storage_key(t) for t in exclude}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.layout == torch.strided and t.device.type != "meta":
            key = _storage_key(t)
            if key not in skip:
                saved[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return out, saved


def saved_bytes(runner: Runner) -> tuple[int, int]:
    """(bytes autograd keeps for backward beyond the inputs, bytes of the output) of one forward.

    Unique storages of every tensor packed by autograd during the forward, leaving out those of
    the inputs and weights (alive anyway). A view of the output counts once, with the output.
    """
    runner.zero_grad()
    out, saved = saved_storages(runner.forward, runner.inputs())
    out_key = _storage_key(out)
    saved.pop(out_key, None)
    del out
    return sum(saved.values()), out_key[1]


class CudaPeak:
    """Peak GPU memory allocated during a `with` block above what was allocated at its start
    (`bytes`, None on other devices). Synchronises at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, None

    def __enter__(self) -> CudaPeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)


def peak_bytes(runner: Runner, mode: str, device: torch.device) -> Optional[int]:
    """Peak GPU memory one call of `mode` allocates above what was allocated before it."""
    if device.type != "cuda":
        return None
    runner.zero_grad()
    with CudaPeak(device) as peak:
        if mode == "forward":
            out = runner.forward()
            torch.cuda.synchronize(device)
            del out
        else:
            runner.forward().backward(runner.out_grad)
    runner.zero_grad()
    return peak.bytes
