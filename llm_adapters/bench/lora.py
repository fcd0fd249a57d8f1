"""LoRA / parallel-adapter layer benchmark: the op, its counts, and the providers timed.

    y = x Wᵀ + b + s · φ(D(x) Aᵀ) Bᵀ        x [M, K], W [N, K], A [r, K], B [N, r]

Providers: `eager` (PEFT's math written plainly: F.linear, dropout, two linears), `peft`
(PEFT's own `lora.Linear` around an nn.Linear holding the same weights), `gemm` (the base
x Wᵀ + b alone: the floor a fused forward is measured against), and `ours-<backend>` for each
backend of `llm_adapters.ops`.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .harness import Case, OpRunner, OpSpec, Provider, Runner
from .parity import ACTIVATION_FNS, lora_reference

# --------------------------------------------------------------------------------------------
# Counts. Sizes: M tokens, K in, N out, r rank; e = activation bytes, w = adapter weight bytes.
# --------------------------------------------------------------------------------------------


def _elem(case: Case) -> tuple[int, int]:
    return case.torch_dtype.itemsize, case.weight_dtype.itemsize


def lora_flops(case: Case) -> float:
    """Multiply-adds x 2 of one call of `case.mode` (elementwise work is not counted)."""
    m, k, n, r = case.tokens, case.k, case.n, case.rank
    fwd = 2 * m * n * k + 2 * m * k * r + 2 * m * n * r  # base GEMM, shrink, expand
    bwd = 2 * m * n * r + 2 * m * n * r + 2 * m * k * r  # dB = s gᵀH, g B, dA = dSᵀ D(x)
    if case.x_grad:
        bwd += 2 * m * n * k + 2 * m * k * r  # dx = g W + D'(dS A)
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[case.mode]


def lora_min_bytes(case: Case) -> float:
    """Compulsory traffic: every input read once, every output written once."""
    m, k, n, r = case.tokens, case.k, case.n, case.rank
    e, w = _elem(case)
    bias = n * e if case.bias else 0
    adapters = (r * k + n * r) * w
    # forward: read x, W, A, B, bias; write y
    fwd = m * k * e + n * k * e + adapters + bias + m * n * e
    # backward: read g, x (for dA), A, B; write dA, dB; with dx also read W and write dx
    bwd = m * n * e + m * k * e + 2 * adapters
    if case.x_grad:
        bwd += n * k * e + m * k * e
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[case.mode]


def gemm_flops(case: Case) -> float:
    m, k, n = case.tokens, case.k, case.n
    per = 2 * m * n * k  # forward x Wᵀ; backward (x_grad only) g W
    return {"forward": per, "backward": per, "full": 2 * per}[case.mode]


def gemm_min_bytes(case: Case) -> float:
    m, k, n = case.tokens, case.k, case.n
    e = case.torch_dtype.itemsize
    per = (m * k + n * k + m * n) * e  # read two operands, write one
    return {"forward": per, "backward": per, "full": 2 * per}[case.mode]


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------


def make_tensors(case: Case, seed: int) -> dict[str, Tensor]:
    """One input set: x (requires grad per case), frozen W and bias, trainable A and B, and
    the output gradient. B is not zero (as after some training), so the branch counts."""
    device = torch.device(case.device)
    gen = torch.Generator(device=device)
    gen.manual_seed(1000 + seed)
    m, k, n, r = case.tokens, case.k, case.n, case.rank
    dt, wt = case.torch_dtype, case.weight_dtype

    def randn(*shape: int, dtype: torch.dtype, std: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype).mul_(std)

    t = {
        "x": randn(m, k, dtype=dt).requires_grad_(case.x_grad),
        "weight": randn(n, k, dtype=dt, std=k**-0.5),
        "lora_a": randn(r, k, dtype=wt, std=k**-0.5).requires_grad_(True),
        "lora_b": randn(n, r, dtype=wt, std=r**-0.5).requires_grad_(True),
        "out_grad": randn(m, n, dtype=dt),
    }
    if case.bias:
        t["bias"] = randn(n, dtype=dt, std=0.1)
    return t


def grad_names(case: Case) -> list[str]:
    return (["x"] if case.x_grad else []) + ["lora_a", "lora_b"]


def reference(t: dict[str, Tensor], mask: Optional[Tensor], scale: float, case: Case) -> Tensor:
    """The op from float64 copies of the inputs, with the provider's keep-mask."""
    return lora_reference(t["x"], t["weight"], t.get("bias"), t["lora_a"], t["lora_b"],
                          scaling=case.scaling, activation=case.activation, keep=mask,
                          inv_keep=scale)


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class _Base(OpRunner):
    grad_names = staticmethod(grad_names)
    dropout_input = "x"


class _EagerRunner(_Base):
    def forward(self) -> Tensor:
        c, t = self.case, self.t
        x = t["x"]
        y = F.linear(x, t["weight"], t.get("bias"))
        xa = x.to(t["lora_a"].dtype)  # PEFT casts x to the adapter dtype
        d = self.dropped(F.dropout(xa, c.dropout, training=True)) if c.dropout > 0 else xa
        branch = F.linear(ACTIVATION_FNS[c.activation](F.linear(d, t["lora_a"])), t["lora_b"])
        return y + (branch * c.scaling).to(y.dtype)


class Eager(Provider):
    """PEFT's LoRA math written plainly: F.linear + dropout + two linears."""

    name = "eager"

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return _EagerRunner(case, tensors)


def _peft_linear(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    """peft.tuners.lora.Linear across PEFT versions (newer ones take a LoraConfig)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    params = inspect.signature(PeftLinear.__init__).parameters
    if "config" in params:
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
        return PeftLinear(base, "default", config=cfg, r=r, lora_alpha=alpha)
    return PeftLinear(base, "default", r=r, lora_alpha=alpha, lora_dropout=dropout)


class _PeftRunner(_Base):
    def __init__(self, case: Case, t: dict[str, Tensor]) -> None:
        super().__init__(case, t)
        base = nn.Linear(case.k, case.n, bias=case.bias, device="meta")
        base.weight = nn.Parameter(t["weight"], requires_grad=False)  # same storage
        if case.bias:
            base.bias = nn.Parameter(t["bias"], requires_grad=False)
        with torch.device(case.device):
            layer = _peft_linear(base, case.rank, case.scaling * case.rank, case.dropout)
        layer.lora_A["default"].weight = nn.Parameter(t["lora_a"].detach().clone())
        layer.lora_B["default"].weight = nn.Parameter(t["lora_b"].detach().clone())
        layer.train()
        self.layer = layer
        self._a, self._b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        layer.lora_dropout["default"].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.dropped(output)

    def forward(self) -> Tensor:
        return self.layer(self.t["x"])

    def grads(self) -> list[Optional[Tensor]]:
        g = [self._a.grad, self._b.grad]
        return ([self.t["x"].grad] if self.case.x_grad else []) + g

    def leaves(self) -> list[Tensor]:
        return ([self.t["x"]] if self.case.x_grad else []) + [self._a, self._b]

    def inputs(self) -> list[Tensor]:
        return super().inputs() + [self._a, self._b]


class Peft(Provider):
    """PEFT's `lora.Linear` wrapping an nn.Linear that holds the same base weight."""

    name = "peft"

    def skip_reason(self, case: Case) -> Optional[str]:
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            return f"peft is not installed ({exc})"
        if case.activation != "identity":
            return "PEFT's LoRA has no branch activation"
        return None

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return _PeftRunner(case, tensors)


class _GemmRunner(_Base):
    def forward(self) -> Tensor:
        return F.linear(self.t["x"], self.t["weight"], self.t.get("bias"))

    def leaves(self) -> list[Tensor]:
        return [self.t["x"]] if self.case.x_grad else []


class Gemm(Provider):
    """The base layer alone, x Wᵀ + b (cuBLAS on a GPU): what LoRA's forward is held to."""

    name = "gemm"
    checks_parity = False

    def skip_reason(self, case: Case) -> Optional[str]:
        if case.mode != "forward" and not case.x_grad:
            return "the frozen base GEMM has no backward when x needs no grad"
        return None

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return _GemmRunner(case, tensors)

    def counts(self, spec: OpSpec, case: Case) -> tuple[float, float]:
        return gemm_flops(case), gemm_min_bytes(case)


class _OursRunner(_Base):
    def __init__(self, case: Case, t: dict[str, Tensor], backend: str) -> None:
        super().__init__(case, t)
        self.backend = backend
        self.seed = 1234

    def forward(self) -> Tensor:
        c, t = self.case, self.t
        return ops.lora_linear(
            t["x"], t["weight"], t.get("bias"), t["lora_a"], t["lora_b"],
            scaling=c.scaling, dropout_p=c.dropout, activation=c.activation, seed=self.seed,
            backend=self.backend,
        )


def backend_skip_reason(op: str, backend: str, device: str, allow_interpreter: bool):
    """Why backend `backend` cannot run `op` on `device` here (None when it can)."""
    dev = torch.device(device)
    why = ops.backend_status(backend)
    if why is not None:
        return f"backend {backend!r} unavailable: {why}"
    if backend == "triton" and dev.type == "cpu" and not allow_interpreter:
        return "Triton on CPU runs in the interpreter (a correctness path, not a timed one)"
    try:
        ops.resolve_backend(op, dev, backend)
    except (ops.BackendUnavailableError, ValueError) as exc:
        return str(exc)
    return None


class Ours(Provider):
    """`llm_adapters.ops.lora_linear` on one backend (subclasses set `op` and `runner`)."""

    op = "lora"
    runner = staticmethod(_OursRunner)

    def __init__(self, backend: str, allow_interpreter: bool = False) -> None:
        self.backend = backend
        self.name = f"ours-{backend}"
        self.allow_interpreter = allow_interpreter

    def skip_reason(self, case: Case) -> Optional[str]:
        return backend_skip_reason(self.op, self.backend, case.device, self.allow_interpreter)

    def build(self, case: Case, tensors: dict[str, Tensor]) -> Runner:
        return self.runner(case, tensors, self.backend)


def providers(backends=ops.BACKENDS, allow_interpreter: bool = False) -> list[Provider]:
    return [Eager(), Peft(), Gemm(), *(Ours(b, allow_interpreter) for b in backends)]


SPEC = OpSpec(
    name="lora",
    make_tensors=make_tensors,
    grad_names=grad_names,
    reference=reference,
    flops=lora_flops,
    min_bytes=lora_min_bytes,
    providers=providers,
)
