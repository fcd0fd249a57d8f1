"""PEFT's `modules_to_save`: modules (an `lm_head`, a `score` head) trained fully beside LoRA.

As in PEFT, the original module stays in place, frozen, and a trainable copy runs instead; the
copy is what is saved, under the module's own key (`base_model.model.lm_head.weight`, PEFT's
layout), so PEFT and this library load each other's files.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

# Where the trained copy sits inside the wrapper (PEFT's in-memory name for adapter "default").
SAVED_PREFIX = "modules_to_save.default."


class SavedModule(nn.Module):
    """Wraps `module` as `base_layer` (left frozen) and runs a trainable copy of it,
    `modules_to_save.default`; other attributes are read from the copy."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.base_layer = module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})

    @property
    def trained(self) -> nn.Module:
        return self.modules_to_save["default"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.trained(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "modules_to_save"):
                raise
            return getattr(self.modules_to_save["default"], name)


def saved_module_matches(name: str, entries: list[str]) -> bool:
    """Whether module `name` is one of `modules_to_save` (PEFT's rule: the name ends with an
    entry)."""
    return any(name.endswith(entry) for entry in entries)
