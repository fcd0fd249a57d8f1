"""LoraLinear: y = base(x) + (alpha / r) · B A D(x), on the fused `ops.lora_linear`; with
`use_dora`, DoRA as PEFT computes it, on `ops.dora_linear`."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import ops
from ..ops.dora import dora_add, dora_weight_norm, weight_row_norm_sq
from ._base import Conv1D, autocast_inputs, linear_dims
from ._quant import (
    adapter_factory,
    add_to_quantized,
    dequantized_weight,
    quant_format,
)
from ._sharded import base_weight_bias, within_units

DEFAULT_ADAPTER = "default"  # the adapter held as lora_A / lora_B (PEFT's first adapter's name)
EXTRA_PREFIX = "lora_extra."  # parameter names of the other named adapters start with this


def cached_weight_norm_sq(holder: nn.Module, owner: Tensor, w: Tensor) -> Tensor:
    """‖W_n‖² [N] of a frozen base weight `w` [N, K] (as the op sees it: `owner`, the base
    layer's parameter, or a view of it), kept on `holder` while `owner`'s storage, version
    counter, and `w`'s shape, dtype and device stay the same (recomputed in a torch.compile
    trace)."""
    if torch.compiler.is_compiling():
        return weight_row_norm_sq(w)
    key = (owner.data_ptr(), owner._version, tuple(w.shape), w.dtype, w.device)
    if key != getattr(holder, "_wsq_key", ()) or getattr(holder, "_wsq", None) is None:
        holder._wsq = weight_row_norm_sq(w)
        holder._wsq_key = key
    return holder._wsq


def _init_lora(
    module: nn.Module, k: int, n: int, r: int, lora_alpha: float, lora_dropout: float,
    use_rslora: bool, init_lora_weights: bool, factory: dict,
) -> None:
    """A LoRA adapter's rank, scaling, dropout and `lora_A` [r, K] / `lora_B` [N, r] (PEFT's
    init: kaiming-uniform A, zero B unless `init_lora_weights` is False), set on `module`."""
    module.r = r
    module.lora_alpha = lora_alpha
    module.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
    module.lora_dropout = float(lora_dropout)
    module.lora_A = nn.Linear(k, r, bias=False, **factory)
    module.lora_B = nn.Linear(r, n, bias=False, **factory)
    nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
    if init_lora_weights:
        nn.init.zeros_(module.lora_B.weight)
    else:
        nn.init.kaiming_uniform_(module.lora_B.weight, a=math.sqrt(5))


class LoraBranch(nn.Module):
    """A named LoRA adapter of a `LoraLinear` other than the default one: `lora_A` [r, K] and
    `lora_B` [N, r] under PEFT's parameter names, its own rank, scaling and dropout; with
    `use_dora`, DoRA's magnitude `lora_magnitude_vector` [N] too (the layer that takes the
    branch sets it to ‖W + s·B A‖ of its base, `LoraLinear.init_branch_magnitude`)."""

    def __init__(
        self, k: int, n: int, r: int, lora_alpha: float, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: bool = True, factory=None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = k, n
        _init_lora(self, k, n, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                   factory or {})
        self.use_dora = bool(use_dora)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.ones(n, **(factory or {})))

    def delta_weight(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        dora = ", dora=True" if self.use_dora else ""
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}{dora}"


class LoraLinear(nn.Module):
    """Wraps an nn.Linear (or GPT-2 Conv1D) as `base_layer` and adds a rank-r update.

    Parameters live beside the base layer under PEFT's names (`lora_A.weight` [r, K],
    `lora_B.weight` [N, r]) so state dicts map onto PEFT's one-to-one.

    A quantized base (bitsandbytes 4-bit / 8-bit, torchao NF4; `_quant`) keeps its own
    product: forward calls it and adds the branch into its output (`ops.lora_add`), so dx is
    the layer's own backward plus the branch's term. Merging into it re-quantizes (lossy).

    `use_dora`: DoRA, with PEFT's parameter `lora_magnitude_vector` [N] (initialised to the row
    norms ‖W + s·B A‖, so the layer starts as LoRA would) and PEFT's math (`ops.dora_linear`).
    ‖W_n‖² of the frozen base is computed once and kept while the base weight's storage and
    version counter stay the same (an in-place change or a merge recomputes it; a write
    through `.data`, which bypasses the version counter, is not seen: call
    `clear_weight_norm_cache()` after one). On a quantized base, as in PEFT, the weight is
    dequantized once per forward for the row norms (and, under dropout, for D(x) Wᵀ) while
    the layer keeps its own product (`ops.dora.dora_add`).

    Other named adapters (PEFT's `add_adapter`) live in `lora_extra` (an `nn.ModuleDict` of
    `LoraBranch`, made on the first one), so the default adapter keeps its names. Several may
    be active at once (`active_adapters`, PEFT's list; `active_adapter` is its first): the
    output is then base(x) plus each active adapter's branch that this layer holds, the first
    on the path above, each further one added into it (`ops.lora_add`, its own dropout and
    scaling); a further DoRA adapter rescales the output so far as PEFT's does (`dora_add`,
    `_add_dora_branch`). A named adapter may be DoRA too (`LoraBranch.use_dora`): it runs as
    the default one's DoRA does, with its own A, B, magnitude, scaling and dropout and the
    layer's cached ‖W_n‖² (mixed batches run plain LoRA adapters only). A layer wrapped only
    for another adapter has no default one (`has_default` False, no `lora_A` / `lora_B` of
    its own).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool = True,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        k, n = linear_dims(base_layer)
        self.quant = quant_format(base_layer)  # None for a float base
        self.base_layer = base_layer
        self.in_features, self.out_features = k, n
        factory = adapter_factory(base_layer)
        _init_lora(self, k, n, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                   factory)
        self.merged = False
        self.disable_adapters = False
        self.has_default = True
        self.active_adapter = DEFAULT_ADAPTER
        self.use_dora = bool(use_dora)
        self._wsq_key: tuple = ()
        self._wsq = None  # ‖W_n‖² of the base weight, for the key above
        self._merged_norm = None  # DoRA's row norms at merge time, for unmerge (as PEFT)
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(n, **factory))
            self.reset_magnitude()

    @property
    def active_adapter(self) -> str:
        """The first active adapter (the one active adapter when only one is)."""
        return self.active_adapters[0]

    @active_adapter.setter
    def active_adapter(self, names: str | list[str]) -> None:
        """Make `names` (one name, or a list of them) this layer's active adapters."""
        names = [names] if isinstance(names, str) else list(names)
        if not names:
            raise ValueError("a LoRA layer needs at least one active adapter name")
        self.active_adapters = names

    @classmethod
    def without_default(cls, base_layer: nn.Module) -> LoraLinear:
        """A wrapper of `base_layer` with no default adapter, for other named adapters only."""
        layer = cls(base_layer, 1, 1.0)
        del layer.lora_A, layer.lora_B
        layer.has_default, layer.r, layer.scaling = False, 0, 0.0
        return layer

    # ---- other named adapters -------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """The adapters this layer holds, the default one first (if it has one)."""
        extra = list(self.lora_extra) if "lora_extra" in self._modules else []
        return ([DEFAULT_ADAPTER] if self.has_default else []) + extra

    def branch(self, name: str) -> nn.Module | None:
        """The module holding adapter `name`'s lora_A / lora_B (this layer for the default
        one), or None if this layer does not have it."""
        if name == DEFAULT_ADAPTER:
            return self if self.has_default else None
        extra = self._modules.get("lora_extra")
        return extra[name] if extra is not None and name in extra else None

    def add_branch(self, name: str, branch: LoraBranch) -> None:
        if "lora_extra" not in self._modules:
            self.lora_extra = nn.ModuleDict()
        self.lora_extra[name] = branch

    def delete_branch(self, name: str) -> None:
        extra = self._modules.get("lora_extra")
        if extra is not None and name in extra:
            del extra[name]
            if not len(extra):
                del self.lora_extra

    def branch_parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter `name`'s own parameters in this layer (DoRA's magnitude included)."""
        module = self.branch(name)
        if module is None:
            return []
        params = [module.lora_A.weight, module.lora_B.weight]
        if module.use_dora:
            params.append(module.lora_magnitude_vector)
        return params

    def is_dora(self, name: str) -> bool:
        """Whether this layer holds adapter `name` as a DoRA adapter."""
        module = self.branch(name)
        return module is not None and module.use_dora

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(Conv1D) and isinstance(self.base_layer, Conv1D)

    def delta_weight(self) -> Tensor:
        """s · B A as [N, K] in float32 (or the adapter's dtype) — PEFT's `get_delta_weight`,
        DoRA or not (a DoRA merge is W' = c ⊙ (W + delta), see `merge`)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    # ---- DoRA ---------------------------------------------------------------------------------
    def _base_nk(self) -> Tensor:
        """The base weight [N, K]: a view of a float base's, or a quantized base's dequantized
        (float32, a new tensor)."""
        if self.quant is not None:
            return dequantized_weight(self.base_layer, self.quant)
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def clear_weight_norm_cache(self) -> None:
        self._wsq_key, self._wsq = (), None

    def _weight_norm_sq(self, w: Tensor) -> Tensor:
        """‖W_n‖² of the base weight `w` [N, K] as the op sees it (`cached_weight_norm_sq`)."""
        return cached_weight_norm_sq(self, self.base_layer.weight, w)

    def weight_norm(self, owner: nn.Module | None = None) -> Tensor:
        """‖W + s·B A‖ per output row [N] of the current (unmerged) base, detached, float32,
        for the default adapter or `owner` (a `LoraBranch` of this layer's base)."""
        owner = self if owner is None else owner
        w = self._base_nk()
        return dora_weight_norm(w, owner.lora_A.weight, owner.lora_B.weight, owner.scaling,
                                self._weight_norm_sq(w))

    def reset_magnitude(self) -> None:
        """m = ‖W + s·B A‖ per row, as PEFT initialises it (call after changing A or B's
        initial values); DoRA then starts as the plain LoRA update."""
        if not self.use_dora or self.merged:
            return
        with torch.no_grad():
            self.lora_magnitude_vector.copy_(self.weight_norm())

    def init_branch_magnitude(self, branch: LoraBranch) -> None:
        """A DoRA branch's m = ‖W + s·B A‖ per row of this layer's (unmerged) base, as PEFT
        initialises a named DoRA adapter; the branch need not be added yet."""
        if not branch.use_dora:
            return
        if self.merged and self.has_default:
            raise ValueError(
                "a new DoRA adapter's magnitude is initialised from the unmerged base weight, "
                "but the default adapter is merged into it: unmerge it first "
                "(la.unmerge_adapter)"
            )
        with torch.no_grad():
            branch.lora_magnitude_vector.copy_(self.weight_norm(branch))

    def _dora_merge(self, sign: int) -> None:
        """W' = c ⊙ (W + s·B A) with c = m / ‖W + s·B A‖ from the unmerged W (sign +1), and its
        inverse W = W' / c − s·B A with the norms kept from the merge (sign −1), as PEFT."""
        with torch.no_grad():
            if sign > 0:
                norm = self.weight_norm()
            elif self._merged_norm is None:
                raise RuntimeError(
                    "cannot unmerge this DoRA layer: the row norms of its merge are not known "
                    "(merged in another process?); load the unmerged adapter instead"
                )
            else:
                norm = self._merged_norm
            c = (self.lora_magnitude_vector.to(norm.dtype) / norm).view(-1, 1)
            w_nk = self._base_nk()
            delta = self.delta_weight().to(c.dtype)
            new = c * (w_nk.to(c.dtype) + delta) if sign > 0 else w_nk.to(c.dtype) / c - delta
            if self.quant is not None:  # re-quantized: lossy, and it warns
                what = "merging" if sign > 0 else "unmerging"
                add_to_quantized(self.base_layer, self.quant, new - w_nk, what)
            else:
                w_nk.copy_(new.to(w_nk.dtype))
        self._merged_norm = norm if sign > 0 else None
        self.clear_weight_norm_cache()  # the base weight changed

    def _check_default_active(self, what: str) -> None:
        if len(self.active_adapters) > 1:
            raise RuntimeError(
                f"{what} folds the default adapter into the base weight, but the active adapters "
                f"are {self.active_adapters}: set_adapter('default') first (merging several "
                "active adapters, or other named adapters, is not supported)"
            )
        if self.active_adapter != DEFAULT_ADAPTER:
            raise RuntimeError(
                f"{what} folds the default adapter into the base weight, but the active adapter "
                f"is {self.active_adapter!r}: set_adapter('default') first (merging other named "
                "adapters is not supported)"
            )

    def merge(self) -> None:
        if self.merged:
            return
        self._check_default_active("merging")
        if not self.has_default:  # nothing of the default adapter here
            self.merged = True
            return
        if self.use_dora:
            self._dora_merge(+1)
            self.merged = True
            return
        if self.quant is not None:
            add_to_quantized(self.base_layer, self.quant, self.delta_weight().detach(), "merging")
            self.merged = True
            return
        w = self.base_layer.weight
        delta = self.delta_weight()
        with torch.no_grad():
            w.add_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        if not self.has_default:
            self.merged = False
            return
        if self.use_dora:
            self._dora_merge(-1)
            self.merged = False
            return
        if self.quant is not None:
            add_to_quantized(
                self.base_layer, self.quant, -self.delta_weight().detach(), "unmerging"
            )
            self.merged = False
            return
        w = self.base_layer.weight
        delta = self.delta_weight()
        with torch.no_grad():
            w.sub_((delta.t() if self.fan_in_fan_out else delta).to(w.dtype))
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disable_adapters:
            return self.base_layer(x)
        rows = self.__dict__.get("row_adapters")
        if rows is not None:
            return self._mixed_forward(x, rows)
        names = [n for n in self.active_adapters if self.branch(n) is not None]
        if not names:  # this layer has none of the active adapters
            return self.base_layer(x)
        y = self._adapter_forward(x, names[0])
        for name in names[1:]:  # base(x) + the first branch, then each further branch added
            branch = self.branch(name)
            y = self._add_dora_branch(y, x, branch) if branch.use_dora else self._add_branch(
                y, x, branch)
        return y

    def _add_dora_branch(self, y: Tensor, x: Tensor, branch: nn.Module) -> Tensor:
        """A further active DoRA adapter (`branch`: this layer, or a DoRA `LoraBranch`) on the
        output `y` of the layer so far, as PEFT runs it (`dora_add`, y standing for the base
        output): without dropout c ⊙ (y − b + s·B A x) + b, so the DoRA scale also rescales
        the earlier adapters' updates in y; under dropout y + (c − 1) ⊙ D(x) Wᵀ + c ⊙ s·B A
        D(x), with this adapter's own D(x) of the layer's input. c = m / ‖W + s·B A‖ of the
        base weight with this adapter's A and B only."""
        return self._dora_add(y, x, branch, branch.lora_dropout if self.training else 0.0)

    def _dora_add(self, y: Tensor, x: Tensor, owner: nn.Module, p: float) -> Tensor:
        """`dora_add` of `owner`'s DoRA update on `y` (a quantized base's own output, or the
        layer's output so far), with the base weight (a quantized base's dequantized once per
        forward, as PEFT) for the row norms and, under dropout, D(x) Wᵀ."""
        lora_a, lora_b = owner.lora_A, owner.lora_B

        def add(w: Tensor, b: Tensor | None, xc: Tensor) -> Tensor:
            xc, w = (t if t.dtype == y.dtype else t.to(y.dtype) for t in (xc, w))
            return dora_add(
                y, xc, w, b, lora_a.weight, lora_b.weight, owner.lora_magnitude_vector,
                scaling=owner.scaling, dropout_p=p, weight_norm_sq=self._weight_norm_sq(w),
            )

        if self.quant is not None:  # the base gathered its own weight in its forward
            w = self._base_nk()
            return within_units((lora_a, lora_b), lambda: add(
                w, getattr(self.base_layer, "bias", None), x))

        def float_base() -> Tensor:
            xc, w, b = autocast_inputs(x, *base_weight_bias(self.base_layer))
            return add(w, b, xc)

        return within_units((self.base_layer, lora_a, lora_b), float_base)

    def _add_branch(self, y: Tensor, x: Tensor, branch: nn.Module) -> Tensor:
        """y + s · B A D(x) for another active adapter's `branch` (its own scaling and dropout),
        added into the output `y` of the layer so far (`ops.lora_add`)."""
        p = branch.lora_dropout if self.training else 0.0
        x = x if x.dtype == y.dtype else x.to(y.dtype)  # as the first branch saw it (autocast)
        return within_units((branch.lora_A, branch.lora_B), lambda: ops.lora_add(
            y, x, branch.lora_A.weight, branch.lora_B.weight, scaling=branch.scaling, dropout_p=p
        ))

    def _adapter_forward(self, x: Tensor, name: str) -> Tensor:
        """base(x) + adapter `name`'s update (this layer holds it): the fused op on a float
        base, the base's own product plus `ops.lora_add` on a quantized one; DoRA for a DoRA
        adapter (the default one or a named one)."""
        owner = self if name == DEFAULT_ADAPTER else self.branch(name)
        p = owner.lora_dropout if self.training else 0.0
        if not owner.use_dora:
            return self._lora_forward(x, owner.lora_A, owner.lora_B, owner.scaling, p)
        return self._dora_forward(x, owner, p)

    def _dora_forward(self, x: Tensor, owner: nn.Module, p: float) -> Tensor:
        """base(x) + DoRA's update of `owner` (this layer, or a DoRA `LoraBranch` of it), with
        its A, B, magnitude and scaling and this layer's cached ‖W_n‖² (of the base only):
        `ops.dora_linear` on a float base, the base's own product plus `dora_add` on a
        quantized one."""
        if self.quant is not None:
            return self._dora_add(self.base_layer(x), x, owner, p)
        lora_a, lora_b = owner.lora_A, owner.lora_B

        def dora() -> Tensor:
            xc, w, b = autocast_inputs(x, *base_weight_bias(self.base_layer))
            return ops.dora_linear(
                xc, w, b, lora_a.weight, lora_b.weight, owner.lora_magnitude_vector,
                scaling=owner.scaling, dropout_p=p, weight_norm_sq=self._weight_norm_sq(w),
            )

        return within_units((self.base_layer, lora_a, lora_b), dora)

    def _mixed_forward(self, x: Tensor, rows: list[str]) -> Tensor:
        """A mixed-adapter batch (inference): row i of `x` [B, ..., K] gets adapter `rows[i]`
        (a name this layer lacks, or "__base__", gets none), on `ops.lora_grouped_add`."""
        if x.shape[0] != len(rows):
            raise ValueError(
                f"adapter_names has {len(rows)} entries but the batch has {x.shape[0]} rows"
            )
        names = [n for n in dict.fromkeys(rows) if self.branch(n) is not None]
        dora = [n for n in names if self.is_dora(n)]
        if dora:
            raise NotImplementedError(
                f"adapter_names= with DoRA adapter(s) {dora} is not supported (mixed batches "
                "run plain LoRA adapters only): run a DoRA adapter with set_adapter"
            )
        y0 = self.base_layer(x)
        if not names:
            return y0
        pos = {n: i for i, n in enumerate(names)}
        per_row = torch.tensor([pos.get(n, -1) for n in rows], dtype=torch.long, device=x.device)
        index = per_row.repeat_interleave(x[0].numel() // x.shape[-1])
        branches = [self.branch(n) for n in names]
        y = y0.reshape(-1, y0.shape[-1])
        y = ops.lora_grouped_add(
            y, x.reshape(-1, x.shape[-1]).to(y0.dtype), index,
            [b.lora_A.weight for b in branches], [b.lora_B.weight for b in branches],
            [b.scaling for b in branches],
        )
        return y.view(y0.shape)

    def _lora_forward(
        self, x: Tensor, lora_a: nn.Linear, lora_b: nn.Linear, scaling: float, p: float
    ) -> Tensor:
        """base(x) + scaling · B A D(x) for the adapter with these lora_A / lora_B (plain
        LoRA): on a float base the fused `ops.lora_linear`, on a quantized one the base's own
        product plus `ops.lora_add`."""
        if self.quant is not None:
            y0 = self.base_layer(x)
            x = x if x.dtype == y0.dtype else x.to(y0.dtype)
            return within_units((lora_a, lora_b), lambda: ops.lora_add(
                y0, x, lora_a.weight, lora_b.weight, scaling=scaling, dropout_p=p
            ))

        def fused() -> Tensor:
            xc, w, b = autocast_inputs(x, *base_weight_bias(self.base_layer))
            return ops.lora_linear(
                xc, w, b, lora_a.weight, lora_b.weight, scaling=scaling, dropout_p=p,
            )

        # the weights are read inside the FSDP units that own them, if any (see _sharded)
        return within_units((self.base_layer, lora_a, lora_b), fused)

    def extra_repr(self) -> str:
        quant = f", base={self.quant}" if self.quant else ""
        dora = ", dora=True" if self.use_dora else ""
        if not self.has_default:
            return f"no default adapter{quant}"
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.lora_dropout}{dora}{quant}"
