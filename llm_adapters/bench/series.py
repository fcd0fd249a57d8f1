"""Series bottleneck adapter benchmark (AdapterH / AdapterP): the op, its counts, providers.

    z = h + s · φ(D(h) Dnᵀ + d_b) Upᵀ + u_b        h [M, N], Dn [r, N], Up [N, r]

Providers: `eager` (LLM-Adapters' formulation: h + up(act(down(dropout(h)))) * s),
`adapterhub` (AdapterHub's bottleneck order written out without installing it: down → act →
up, scaled, dropout on the adapter *output*, residual added after; layer norms off), and
`ours-<backend>` for each backend of `llm_adapters.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from . import lora
from .harness import Case, OpRunner, OpSpec, Provider, Runner
from .parity import ACTIVATION_FNS, series_reference

# --------------------------------------------------------------------------------------------
# Counts. Sizes: M tokens, N hidden, r bottleneck; e = activation bytes, w = adapter bytes.
# --------------------------------------------------------------------------------------------


def series_flops(case: Case) -> float:
    """Multiply-adds x 2 of one call of `case.mode`: four rank-r GEMM-sized products."""
    m, n, r = case.tokens, case.n, case.rank
    fwd = 2 * m * n * r + 2 * m * n * r  # S = D(h) Dnᵀ, then φ(S) Upᵀ
    bwd = 2 * m * n * r + 2 * m * n * r + 2 * m * n * r  # dUp = s gᵀH, g Up, dDn = dSᵀ D(h)
    if case.x_grad:
        bwd += 2 * m * n * r  # dh = g + D'(dS Dn)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[case.mode]


def series_min_bytes(case: Case) -> float:
    """Compulsory traffic: the op is memory-bound, so this is the number that matters."""
    m, n, r = case.tokens, case.n, case.rank
    e, w = case.torch_dtype.itemsize, case.weight_dtype.itemsize
    adapters = 2 * n * r * w + ((r + n) * w if case.bias else 0)
    fwd = 2 * m * n * e + adapters  # read h, write z
    bwd = 2 * m * n * e + 2 * adapters  # read g and h; read and write the adapter weights
    if case.x_grad:
        bwd += m * n * e  # write dh
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[case.mode]


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------


def make_tensors(case: Case, seed: int) -> dict[str, Tensor]:
    """One input set: h (requires grad per case), trainable Dn and Up (N(0, 0.02)-sized, as
    LLM-Adapters' "bert" init, but Up non-zero), optional biases, and the output gradient."""
    if case.k != case.n:
        raise ValueError(f"the series adapter maps N to N: k ({case.k}) must equal n ({case.n})")
    device = torch.device(case.device)
    gen = torch.Generator(device=device)
    gen.manual_seed(2000 + seed)
    m, n, r = case.tokens, case.n, case.rank
    dt, wt = case.torch_dtype, case.weight_dtype

    def randn(*shape: int, dtype: torch.dtype, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(std)

    t = {
        "h": randn(m, n, dtype=dt).requires_grad_(case.x_grad),
        "down": randn(r, n, dtype=wt, std=n**-0.5).requires_grad_(True),
        "up": randn(n, r, dtype=wt, std=r**-0.5).requires_grad_(True),
        "out_grad": randn(m, n, dtype=dt),
    }
    if case.bias:
        t["down_bias"] = randn(r, dtype=wt, std=0.1).requires_grad_(True)
        t["up_bias"] = randn(n, dtype=wt, std=0.1).requires_grad_(True)
    return t


def grad_names(case: Case) -> list[str]:
    names = (["h"] if case.x_grad else []) + ["down", "up"]
    return names + (["down_bias", "up_bias"] if case.bias else [])


def reference(t: dict[str, Tensor], mask: Optional[Tensor], scale: float, case: Case) -> Tensor:
    """The op from float64 copies of the inputs, with the provider's keep-mask (on h)."""
    return series_reference(t["h"], t["down"], t["up"], scaling=case.scaling,
                            activation=case.activation, keep=mask, inv_keep=scale,
                            down_bias=t.get("down_bias"), up_bias=t.get("up_bias"))


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class _Base(OpRunner):
    grad_names = staticmethod(grad_names)
    dropout_input = "h"


class _EagerRunner(_Base):
    def forward(self) -> Tensor:
        c, t = self.case, self.t
        h = t["h"]
        d = self.dropped(F.dropout(h, c.dropout, training=True)) if c.dropout > 0 else h
        down = F.linear(d.to(t["down"].dtype), t["down"], t.get("down_bias"))
        out = F.linear(ACTIVATION_FNS[c.activation](down), t["up"]) * c.scaling
        if "up_bias" in t:  # outside the scaling, as the op defines it (DESIGN §2.2)
            out = out + t["up_bias"]
        return h + out.to(h.dtype)


class Eager(Provider):
    """LLM-Adapters' bottleneck adapter: h + up(act(down(dropout(h)))) * s."""

    name = "eager"

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return _EagerRunner(case, tensors)


class _AdapterHubRunner(_Base):
    def forward(self) -> Tensor:
        c, t = self.case, self.t
        h = t["h"]
        down = ACTIVATION_FNS[c.activation](F.linear(h.to(t["down"].dtype), t["down"],
                                                     t.get("down_bias")))
        up = F.linear(down, t["up"], t.get("up_bias")) * c.scaling
        out = F.dropout(up, c.dropout, training=True) if c.dropout > 0 else up
        return out.to(h.dtype) + h  # residual after (residual_before_ln, no layer norms)


class AdapterHub(Provider):
    """AdapterHub's bottleneck order: down → act → up, scale, dropout on the output, + h."""

    name = "adapterhub"

    def parity_skip_reason(self, case: Case) -> Optional[str]:
        if case.dropout > 0:
            return "dropout on the adapter output: a different function when p > 0"
        if case.bias and case.scaling != 1.0:
            return "scales the up-projection's bias: a different function when s != 1"
        return None

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return _AdapterHubRunner(case, tensors)


class _OursRunner(_Base):
    def __init__(self, case: Case, t: dict[str, Tensor], backend: str) -> None:
        super().__init__(case, t)
        self.backend = backend
        self.seed = 4321

    def forward(self) -> Tensor:
        c, t = self.case, self.t
        return ops.series_adapter(
            t["h"], t["down"], t["up"], scaling=c.scaling, activation=c.activation,
            dropout_p=c.dropout, seed=self.seed, down_bias=t.get("down_bias"),
            up_bias=t.get("up_bias"), backend=self.backend,
        )


class Ours(lora.Ours):
    """`llm_adapters.ops.series_adapter` on one backend."""

    op = "series"
    runner = staticmethod(_OursRunner)


def providers(backends=ops.BACKENDS, allow_interpreter: bool = False) -> list[Provider]:
    return [Eager(), AdapterHub(), *(Ours(b, allow_interpreter) for b in backends)]


SPEC = OpSpec(
    name="series",
    make_tensors=make_tensors,
    grad_names=grad_names,
    reference=reference,
    flops=series_flops,
    min_bytes=series_min_bytes,
    providers=providers,
)
