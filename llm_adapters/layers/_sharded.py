"""Adapter layers under FSDP: the fused op must see whole 2-D weights and their true flags.

A fused op reads its weights directly instead of calling the modules that own them, which is
where FSDP (`torch.distributed.fsdp`) does its work. Two things follow, each handled here:

- FSDP1 with `use_orig_params=True` replaces, inside a unit's forward, every original parameter
  by a view into the unit's flat parameter. The view requires grad whenever anything in the
  unit does (the adapter weights do), even where the original parameter - a frozen base
  weight - does not. `frozen_aware` gives such a view detached when the parameter it stands
  for is frozen, so the op's frozen-weight check reads the parameter's own flag; a trainable
  base weight still reaches the op as it is, and is refused there as always.
- A wrap policy may give a layer's projection its own unit: PEFT's `fsdp_auto_wrap_policy`
  wraps every trainable leaf module, so `lora_A` and `lora_B` become units of their own. Such a
  unit's weight is whole only inside that unit's forward (elsewhere it is a 1-D local shard).
  `within_units` runs the fused computation inside the forward of each such unit: the weights
  are gathered around it, FSDP's hooks on its output gather them again before its backward,
  and their gradients are reduce-scattered after it, as for a module FSDP called itself.

Without FSDP both are a type check and return at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Optional

from torch import Tensor, nn

from ._base import Conv1D

_FSDP_CLASSES: Optional[tuple[type, type]] = None


def _fsdp_classes() -> tuple[type, ...]:
    """(FSDP1 wrapper class, FSDP2 module class) once FSDP is imported; () before that (no
    module can be sharded by an FSDP that was never imported, and importing it costs time)."""
    global _FSDP_CLASSES
    if _FSDP_CLASSES is None:
        if "torch.distributed.fsdp" not in sys.modules:
            return ()
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        _FSDP_CLASSES = (FullyShardedDataParallel, FSDPModule)
    return _FSDP_CLASSES


def frozen_aware(module: nn.Module, name: str) -> Optional[Tensor]:
    """`module.<name>` as the op should take it: detached when it is FSDP1's view of a frozen
    parameter (see the module docstring); otherwise unchanged."""
    t = getattr(module, name)
    if t is None or isinstance(t, nn.Parameter) or not t.requires_grad:
        return t
    flat = t._base  # FSDP1: the FlatParameter the view was cut from
    infos = getattr(flat, "_param_infos", None)
    params = getattr(flat, "_params", None)  # the original parameters (use_orig_params=True)
    if infos is None or params is None:
        return t
    for info, param in zip(infos, params):
        if info.module is module and info.param_name == name:
            return t if param.requires_grad else t.detach()
    return t


def base_weight_bias(base_layer: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """The base layer's weight as [N, K] (a transposed view for Conv1D) and its bias, each
    through `frozen_aware`."""
    w = frozen_aware(base_layer, "weight")
    if bool(Conv1D) and isinstance(base_layer, Conv1D):
        w = w.t()
    return w, frozen_aware(base_layer, "bias")


def within_units(modules: tuple[nn.Module, ...], fn: Callable[[], Any]) -> Any:
    """fn(), run inside the forward of every module of `modules` that is an FSDP unit of its
    own (FSDP1 `FullyShardedDataParallel` or FSDP2 `fully_shard`); plain fn() when none is."""
    classes = _fsdp_classes()
    if not classes:
        return fn()
    units = [m for m in modules if isinstance(m, classes)]
    if not units:
        return fn()
    fsdp1 = classes[0]

    def run(i: int) -> Any:
        if i == len(units):
            return fn()
        unit = units[i]
        # FSDP1 calls the module it wraps between its pre- and post-forward; FSDP2's hooks sit
        # on the module itself. That module's forward becomes, for this one call, the rest.
        target = unit.module if isinstance(unit, fsdp1) else unit
        own = target.__dict__.get("forward")
        target.forward = lambda *_args, **_kwargs: run(i + 1)
        try:
            return unit()
        finally:
            if own is None:
                del target.forward
            else:
                target.forward = own

    return run(0)
