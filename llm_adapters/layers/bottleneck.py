"""Bottleneck adapters around a Linear, in LLM-Adapters' three placements.

    input    z = x + s·up(φ(down(D(x))));  y = base(z)        (AdapterH on gate/up-type layers)
    output   h = base(x);  y = h + s·up(φ(down(D(h))))        (AdapterH on the others; AdapterP)
    parallel y = base(x) + s·up(φ(down(D(x))))                (parallel adapter)

Series placements run on the fused `ops.series_adapter`, the parallel one on
`ops.lora_linear` with φ. On a quantized base (`_quant`) the series placements only call the
base layer; the parallel one adds its branch into the layer's own output (`ops.lora_add`).
Parameter names follow LLM-Adapters: `adapter_down`, `adapter_up`, and `adapter_scale` when
the scaling is learned.

A model may hold adapters of several kinds side by side (LoRA on attention, a series adapter on
the MLP), each named: `adapter_name` says which named adapter a layer belongs to, and `active`
whether that adapter is among the model's active ones (an inactive layer runs as its base).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ._base import autocast_inputs, linear_dims
from ._quant import adapter_factory, quant_format
from ._sharded import base_weight_bias, within_units
from .lora import DEFAULT_ADAPTER

PLACEMENTS = ("input", "output", "parallel")
INITS = ("bert", "mam_adapter", "zero_up")


def init_bottleneck(down: nn.Linear, up: nn.Linear, init_weights: str) -> None:
    """Initialise the two projections in place; biases (when present) are 0 in every scheme.

    - "bert" (LLM-Adapters' default, its `init_bert_weights`): both weights N(0, 0.02).
    - "mam_adapter" (LLM-Adapters' other choice, after He et al.'s MAM adapter): down
      Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear's default;
      up = 0, so the adapter starts as the identity.
    - "zero_up" (this library's): down N(0, 0.02) as "bert", up = 0.
    """
    if init_weights not in INITS:
        raise ValueError(f"init_weights must be one of {INITS}, got {init_weights!r}")
    if init_weights == "mam_adapter":
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    else:
        nn.init.normal_(down.weight, std=0.02)
    if init_weights == "bert":
        nn.init.normal_(up.weight, std=0.02)
    else:
        nn.init.zeros_(up.weight)
    for proj in (down, up):
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


class BottleneckAdapter(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        bottleneck_size: int,
        placement: str,
        non_linearity: str = "tanh",
        adapter_dropout: float = 0.0,
        scaling: float | str = 1.0,
        init_weights: str = "bert",
        use_bias: bool = False,
    ) -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        k, n = linear_dims(base_layer)
        self.quant = quant_format(base_layer)  # None for a float base
        self.base_layer = base_layer
        self.placement = placement
        self.non_linearity = non_linearity
        self.adapter_dropout = float(adapter_dropout)
        inner_in = k if placement in ("input", "parallel") else n
        outer = k if placement == "input" else n
        factory = adapter_factory(base_layer)
        self.adapter_down = nn.Linear(inner_in, bottleneck_size, bias=use_bias, **factory)
        self.adapter_up = nn.Linear(bottleneck_size, outer, bias=use_bias, **factory)
        init_bottleneck(self.adapter_down, self.adapter_up, init_weights)
        if scaling == "learned":
            self.adapter_scale = nn.Parameter(torch.ones((), **factory))
            self.scaling = None
        else:
            self.adapter_scale = None
            self.scaling = float(scaling)
        self.disable_adapters = False
        self.adapter_name = DEFAULT_ADAPTER  # the named adapter this layer belongs to
        self.active = True  # whether that adapter is active (set by the model's set_adapter)

    def _scale(self):
        return self.adapter_scale if self.adapter_scale is not None else self.scaling

    def _series(self, h: Tensor) -> Tensor:
        return ops.series_adapter(
            h,
            self.adapter_down.weight,
            self.adapter_up.weight,
            scaling=self._scale(),
            activation=self.non_linearity,
            dropout_p=self.adapter_dropout if self.training else 0.0,
            down_bias=self.adapter_down.bias,
            up_bias=self.adapter_up.bias,
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.disable_adapters:
            return self.base_layer(x)
        rows = self.__dict__.get("row_adapters")
        if rows is not None:
            return self._mixed_forward(x, rows)
        if not self.active:
            return self.base_layer(x)
        # the adapter's weights are read inside the FSDP units that own them, if any
        units = (self.adapter_down, self.adapter_up)
        if self.placement == "input":
            return self.base_layer(within_units(units, lambda: self._series(x)))
        if self.placement == "output":
            h = self.base_layer(x)
            return within_units(units, lambda: self._series(h))
        if self.quant is not None:  # the base's own product, the branch added into it
            # the base layer is called outside the adapter's units: a base that is a unit of
            # its own gathers its weight in its own forward
            y0 = self.base_layer(x)
            xc = x if x.dtype == y0.dtype else x.to(y0.dtype)
            return within_units(units, lambda: ops.lora_add(y0, xc, **self._branch()))
        return within_units((self.base_layer, *units), lambda: self._parallel(x))

    def _mixed_forward(self, x: Tensor, rows: list[str]) -> Tensor:
        """A mixed-adapter batch (inference): the rows of `x` [B, ..., K] whose entry in `rows`
        is this layer's adapter get it, every other row runs as the base (the model sets
        `row_adapters` for the duration of the call)."""
        if x.shape[0] != len(rows):
            raise ValueError(
                f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows"
            )
        picked = [i for i, name in enumerate(rows) if name == self.adapter_name]
        if not picked:
            return self.base_layer(x)
        idx = torch.tensor(picked, dtype=torch.long, device=x.device)
        units = (self.adapter_down, self.adapter_up)

        def on_rows(t: Tensor, fn) -> Tensor:  # t with fn applied to the picked rows only
            return t.index_copy(0, idx, within_units(units, lambda: fn(t.index_select(0, idx))))

        if self.placement == "input":
            return self.base_layer(on_rows(x, self._series))
        y0 = self.base_layer(x)
        if self.placement == "output":
            return on_rows(y0, self._series)
        xc = (x if x.dtype == y0.dtype else x.to(y0.dtype)).index_select(0, idx)
        return y0.index_copy(
            0, idx, within_units(units, lambda: ops.lora_add(y0.index_select(0, idx), xc,
                                                             **self._branch()))
        )

    def _branch(self) -> dict:
        """The parallel branch's arguments, shared by `ops.lora_linear` (float base) and
        `ops.lora_add` (quantized base). Read inside `within_units`: under FSDP the
        projections' weights are whole only there."""
        return dict(
            lora_a=self.adapter_down.weight,
            lora_b=self.adapter_up.weight,
            scaling=self._scale(),
            dropout_p=self.adapter_dropout if self.training else 0.0,
            activation=self.non_linearity,
            lora_a_bias=self.adapter_down.bias,
            lora_b_bias=self.adapter_up.bias,
        )

    def _parallel(self, x: Tensor) -> Tensor:
        x, w, b = autocast_inputs(x, *base_weight_bias(self.base_layer))
        return ops.lora_linear(x, w, b, **self._branch())

    def extra_repr(self) -> str:
        name = "" if self.adapter_name == DEFAULT_ADAPTER else f"adapter={self.adapter_name}, "
        return (
            f"{name}placement={self.placement}, bottleneck={self.adapter_down.out_features}, "
            f"non_linearity={self.non_linearity}"
        )
