"""Saving an adapter from a model trained under FSDP, DDP or in one process.

Under FSDP the adapter weights are sharded: FSDP2 (`fully_shard`) holds DTensors, FSDP1
(`FullyShardedDataParallel(use_orig_params=True)`) holds each original parameter as a 1-D
slice of its rank's shard (or an empty tensor). Saving them as they are fails in safetensors or
writes a fraction. `full_adapter_state` gathers them - a collective: every rank calls it - into
whole CPU tensors on rank 0; the other ranks get nothing back and write nothing.
`load_full_adapter_state` is the way back (resuming a checkpoint): every rank reads the same
whole tensors and keeps its shard of each. `staged_directory` makes the write atomic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# module names that wrappers insert into parameter names (FSDP1, activation checkpointing,
# torch.compile); a saved key is the name without them, as in the unwrapped model
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """A parameter or module name without the segments FSDP1 / checkpoint / compile wrappers
    insert (`layers.0._fsdp_wrapped_module.mlp` -> `layers.0.mlp`)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not _distributed() or torch.distributed.get_rank() == 0


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(root, inner): the module a collective state dict must be taken from (the outermost
    FSDP1 or DDP wrapper handed in) and the model inside it."""
    compiled = getattr(model, "_orig_mod", None)  # torch.compile around the wrapper
    if isinstance(compiled, nn.Module):
        model = compiled
    root = model
    while True:
        inner = getattr(model, "module", None)  # FSDP1 and DDP wrappers
        if not isinstance(inner, nn.Module) or not _is_wrapper(model):
            return root, model
        model = inner


def _is_wrapper(model: nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return True
    fsdp1 = _fsdp1_class()
    return fsdp1 is not None and isinstance(model, fsdp1)


def _fsdp1_class():
    import sys

    if "torch.distributed.fsdp" not in sys.modules:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _is_sharded(p: Tensor) -> bool:
    """A DTensor (FSDP2) or an FSDP1-managed original parameter (a slice of a flat shard)."""
    if getattr(p, "_fsdp_flattened", False):
        return True
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def needs_gather(params: dict[str, Tensor]) -> bool:
    """Whether any of `params` is sharded (so the state must be gathered by every rank)."""
    sharded = [k for k, p in params.items() if _is_sharded(p)]
    if sharded and not _distributed():
        raise RuntimeError(
            f"adapter parameter {sharded[0]!r} is sharded but no process group is initialized"
        )
    return bool(sharded)


def _fsdp1_units(root: nn.Module, params: dict[str, nn.Parameter], keys: list[str]):
    """[(unit, keys of `params` it holds)] for the FSDP1-managed `keys`, each key under the
    innermost unit holding it, outer units first; a clear error for one held outside `root`."""
    fsdp1 = _fsdp1_class()
    units = fsdp1.fsdp_modules(root)  # outer units before the units inside them
    _lazy_init_roots(units)
    owner: dict[int, nn.Module] = {}
    for unit in units:
        for p in unit.parameters():
            owner[id(p)] = unit  # the innermost unit holding p wins
    orphan = [k for k in keys if id(params[k]) not in owner]
    if orphan:
        raise ValueError(
            f"adapter parameter {orphan[0]!r} is sharded by a FullyShardedDataParallel "
            "unit outside the model given: pass the FullyShardedDataParallel-wrapped model "
            "(the FSDP root) to save or load the adapter, on every rank"
        )
    held = [(unit, [k for k in keys if owner[id(params[k])] is unit]) for unit in units]
    return [(unit, ks) for unit, ks in held if ks]


def _lazy_init_roots(units: list[nn.Module]) -> None:
    """Let every outermost FSDP1 unit take its place as a root, as its first forward would:
    a unit summoned before that (a save or load before training) would make itself a root,
    and the optimizer-state calls that follow (Trainer's resume) then fail on it."""
    try:
        from torch.distributed.fsdp._runtime_utils import _lazy_init
    except ImportError:  # pragma: no cover - FSDP1's internals moved: summon as before
        return
    inner = {id(m) for u in units for m in u.modules() if m is not u}
    for unit in units:
        if id(unit) not in inner:
            _lazy_init(unit, unit)


def full_adapter_state(root: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """key -> the whole parameter as a CPU tensor, gathered from the shards of every rank.

    A collective: every rank must call it, with the same model. Rank 0 gets every key of
    `params`; the other ranks get {}. A DTensor (FSDP2) is gathered by `full_tensor()`; an
    FSDP1 parameter inside `summon_full_params` of the innermost unit that holds it, one unit
    at a time (never the whole model at once, unless one unit holds it all), without writeback.
    """
    from torch.distributed.tensor import DTensor

    writer = is_writer()
    out: dict[str, Tensor] = {}
    flattened = [k for k, p in params.items() if getattr(p, "_fsdp_flattened", False)]
    if flattened:
        fsdp1 = _fsdp1_class()
        for unit, held in _fsdp1_units(root, params, flattened):
            with fsdp1.summon_full_params(unit, recurse=False, writeback=False):
                if writer:
                    for k in held:
                        out[k] = params[k].detach().to("cpu", copy=True)
    for key, p in params.items():
        if key in out or key in flattened:
            continue
        t = p.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()  # a collective, in the same key order on every rank
        if writer:
            out[key] = t.to("cpu", copy=True)
    if not writer:
        return {}
    return {key: out[key].contiguous() for key in params}


def full_shapes(root: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, tuple[int, ...]]:
    """key -> the shape of the whole parameter: a DTensor's global shape, an FSDP1 parameter's
    original shape as its flat parameter records it (None where it records none)."""
    shapes: dict[str, tuple[int, ...]] = {}
    flattened = {id(p): k for k, p in params.items() if getattr(p, "_fsdp_flattened", False)}
    if flattened:
        for unit in _fsdp1_class().fsdp_modules(root):
            flat = getattr(unit, "_flat_param", None)
            originals = getattr(flat, "_params", None) or ()
            for p, shape in zip(originals, getattr(flat, "_shapes", ())):
                if id(p) in flattened:
                    shapes[flattened[id(p)]] = tuple(shape)
    return {k: shapes.get(k) if id(p) in flattened else tuple(p.shape) for k, p in params.items()}


def load_full_adapter_state(
    root: nn.Module, params: dict[str, nn.Parameter], tensors: dict[str, Tensor]
) -> None:
    """Copy whole tensors (key -> tensor, the shapes of `full_shapes`) into `params`, sharded
    or not. A collective when any is sharded: every rank calls it with the same `tensors`.
    An FSDP2 DTensor keeps its own shard of the tensor (no communication); an FSDP1 parameter
    is written inside `summon_full_params(writeback=True)` of the unit holding it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    flattened = [k for k, p in params.items() if getattr(p, "_fsdp_flattened", False)]
    with torch.no_grad():
        if flattened:
            fsdp1 = _fsdp1_class()
            for unit, held in _fsdp1_units(root, params, flattened):
                with fsdp1.summon_full_params(unit, recurse=False, writeback=True):
                    for k in held:
                        params[k].copy_(tensors[k])
        for key, p in params.items():
            if key in flattened:
                continue
            t = tensors[key].to(device=p.device, dtype=p.dtype)
            if isinstance(p, DTensor):
                t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(t)


def barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


@contextlib.contextmanager
def staged_directory(directory: str, remove: tuple[str, ...] = ()) -> Iterator[str]:
    """A temporary sibling folder to write into; on success its files take their place in
    `directory` (a new folder is renamed into place whole; in an existing one each file
    replaces its namesake by `os.replace`, other files stay, and the files named in `remove`
    that the save did not write are deleted). On failure the temporary folder is removed and
    `directory` is as it was: no half-written folder, a previous save intact."""
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", suffix=".tmp", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # as os.makedirs would have made it, not mkdtemp's 0o700
        yield tmp
        if not os.path.isdir(directory):
            os.replace(tmp, directory)
            return
        written = sorted(os.listdir(tmp))
        for name in written:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        for name in remove:
            path = os.path.join(directory, name)
            if name not in written and os.path.isfile(path):
                os.remove(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
