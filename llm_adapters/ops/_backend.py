"""The backend contract: what `torch_backend`, `triton_backend` and `cuda_backend` provide.

Each backend module exposes one object, `BACKEND`, that satisfies `Backend`. The dispatcher
(`_dispatch`) hands it 2-D, validated inputs (`ops/__init__.py` checks shapes, dtypes and
devices once); the op factory (`_custom`) wraps its forward/backward pairs in autograd, both as a
`torch.library` custom op and as an eager autograd.Function, from one spec per op.

The functions, on validated inputs:

lora_forward(x, weight, bias, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)
    x [M, K], weight [N, K] (any strides; x.dtype), bias [N] | None, a [r, K], b [N, r],
    a_bias [r] | None, b_bias [N] | None, scale_t: 0-dim learned scale | None (then `scaling`),
    p: dropout probability, seed: int, activation: a name from ACTIVATIONS.
    -> (y [M, N] x.dtype, s_pre [M, r] = D(x) aᵀ + a_bias in acc_dtype(x.dtype), mask)
    mask: the [M, K] bool keep-mask when the backend `stores_mask` and p > 0, else empty [0].
lora_backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs)
    needs = (dx, dbias, da, db, da_bias, db_bias, dscale) booleans
    -> 7 tensors in that order: dx in g.dtype, the others in acc_dtype(g.dtype) (the wrapper
    casts each to its input's dtype); where not needed, an empty [0] tensor of that dtype.
    acc_dtype is float32, or float64 for float64 inputs (gradcheck).
lora_add_forward(x, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation)
    y0 [M, N] x.dtype: a base output computed elsewhere (a quantized layer's own product);
    other inputs as lora_forward. -> (y = y0 + the branch [M, N] x.dtype, s_pre, mask) as
    lora_forward. y0 is read, never written: y is a new tensor (so autograd may keep y0 for
    whatever backward needs it); the custom op declares no mutated input.
lora_add_backward(g, x, a, b, scale_t, scaling, p, seed, activation, s_pre, mask, needs)
    needs = (dx, da, db, da_bias, db_bias, dscale) -> 6 tensors, dtypes as above; dx is the
    branch's term D'(dS a) only (the base layer's backward adds its own through y0), and
    dy0 = g is not returned: the op wrapper hands g on (`_custom.OpSpec.passthrough`).
series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation)
    h [M, N], down [r, N], up [N, r] -> (z [M, N], s_pre [M, r] acc dtype, mask [M, N] | [0])
series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs)
    needs = (dh, ddown, dup, ddown_bias, dup_bias, dscale) -> 6 tensors, dtypes as above.
dora_forward(x, weight, bias, a, b, col_scale, scaling, p, seed, save_t)
    DoRA (ops/dora.py): T = x weightᵀ + s·(D(x) aᵀ) bᵀ in the accumulation dtype, then
    y = round(c ⊙ T + bias) with c = col_scale [N] (acc dtype) applied before the bias.
    -> (y [M, N] x.dtype, s_pre [M, r] acc dtype, mask, t): t = round(T) [M, N] x.dtype when
    save_t (the column scale needs a gradient), else empty [0].
dora_backward(g, x, weight, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs)
    needs = (dx, dbias, da, db, dcol); with gc = c ⊙ g: dx = gc weight + s·D'((gc b) a),
    dbias = Σ_rows g, da = s·(gc b)ᵀ D(x), db = s·gcᵀ s_pre, dcol = Σ_rows g ⊙ t (an error
    when t is empty) -> 5 tensors, dtypes as lora_backward.
dora_add_forward(x, y0, a, b, bias, col_scale, scaling, p, seed, save_t)
    the same over a base output y0 [M, N] without its bias: T = y0 + s·(D(x) aᵀ) bᵀ.
dora_add_backward(g, x, a, b, col_scale, scaling, p, seed, s_pre, mask, t, needs)
    needs = (dx, dy0, da, db, dbias, dcol) -> 6 tensors: dx the branch's term only, dy0 = gc
    in g.dtype, the others as dora_backward.
The dora pair is there only where a backend lists "dora" / "dora_add" in `ops` (it is not
part of the Protocol below: a backend without it is still a Backend).

Dropout is reproducible: the same seed gives the same keep-mask in forward, in backward and on
every call, and `keep_mask(shape, p, seed, device)` returns it (tests build exact references
from it). The triton and cuda backends regenerate one and the same Philox mask from the seed
(bit-identical, checked in tests/test_cuda_extension.py); the torch backend draws its own, cheaper
on a CPU, and stores it for backward.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    """One implementation of the adapter ops (see the module docstring for the contract)."""

    name: str
    ops: frozenset[str]  # the ops it implements: keys of _custom.SPECS
    stores_mask: bool  # forward returns the keep-mask for backward (else regenerated from seed)

    def available(self) -> Optional[str]:
        """None when the backend can be used in this process, else the reason it cannot."""
        ...

    def supports_device(self, device: torch.device) -> Optional[str]:
        """None when it runs tensors on `device`, else why not."""
        ...

    def keep_mask(self, shape: tuple[int, ...], p: float, seed: int,
                  device: torch.device) -> Tensor:
        """The bool keep-mask (True = kept) this backend uses for `seed` on a 2-D `shape`."""
        ...

    def lora_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor,
                     b: Tensor, a_bias: Optional[Tensor], b_bias: Optional[Tensor],
                     scale_t: Optional[Tensor], scaling: float, p: float, seed: int,
                     activation: str) -> tuple[Tensor, Tensor, Tensor]: ...

    def lora_backward(self, g: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor,
                      scale_t: Optional[Tensor], scaling: float, p: float, seed: int,
                      activation: str, s_pre: Tensor, mask: Tensor,
                      needs: list[bool]) -> tuple[Tensor, ...]: ...

    def lora_add_forward(self, x: Tensor, y0: Tensor, a: Tensor, b: Tensor,
                         a_bias: Optional[Tensor], b_bias: Optional[Tensor],
                         scale_t: Optional[Tensor], scaling: float, p: float, seed: int,
                         activation: str) -> tuple[Tensor, Tensor, Tensor]: ...

    def lora_add_backward(self, g: Tensor, x: Tensor, a: Tensor, b: Tensor,
                          scale_t: Optional[Tensor], scaling: float, p: float, seed: int,
                          activation: str, s_pre: Tensor, mask: Tensor,
                          needs: list[bool]) -> tuple[Tensor, ...]: ...

    def series_forward(self, h: Tensor, down: Tensor, up: Tensor, down_bias: Optional[Tensor],
                       up_bias: Optional[Tensor], scale_t: Optional[Tensor], scaling: float,
                       p: float, seed: int, activation: str) -> tuple[Tensor, Tensor, Tensor]:
        ...

    def series_backward(self, g: Tensor, h: Tensor, down: Tensor, up: Tensor,
                        scale_t: Optional[Tensor], scaling: float, p: float, seed: int,
                        activation: str, s_pre: Tensor, mask: Tensor,
                        needs: list[bool]) -> tuple[Tensor, ...]: ...
