"""The numerics every layer of the package shares: the bottom of the house.

Kernels (`triton_kernels/`, and `csrc/` through the codes checked by a test), backends
(`ops/`), layers and the benchmarks all import these names from here, so each rule exists once:

- the branch non-linearities φ: their names, the integer codes the fused kernels specialise on
  (`csrc/common.cuh` `enum Activation` must match `ACTIVATION_CODES`), and φ / φ' in PyTorch on
  rank-sized tensors. Every name of transformers' `ACT2FN` is accepted too, as LLM-Adapters
  accepts it: the aliases of a fused function (`ACTIVATION_ALIASES`) become that function,
  every other name is transformers' module itself (run by the torch backend only);
- the dropout threshold: p realised on a 16-bit lane, and the inverted-dropout scale;
- the accumulation dtype of rank-sized intermediates;
- the M bucketing that kernel autotuning and backend tables key on;
- the TF32 rule for float32 products.

Only the rank-sized pre-activation S ([M, r]) goes through the PyTorch φ / φ' below, so
clarity beats fusion there: each is a handful of elementwise ops on a tensor r/K the size of x.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# The fused activations: what the Triton and CUDA kernels implement.
ACTIVATIONS = ("identity", "tanh", "relu", "gelu", "silu")
# The fused kernels' compile-time switch (Triton constexpr ACT, csrc `enum Activation`).
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# Names of transformers' ACT2FN that compute a fused function exactly (the same formula; checked
# against ACT2FN in tests/test_activations.py), so they run on the fused kernels. The tanh
# approximations of GELU (gelu_new, gelu_pytorch_tanh, gelu_python_tanh, gelu_fast, ...) are
# not erf GELU and have no fused code.
ACTIVATION_ALIASES = {"linear": "identity", "swish": "silu", "gelu_python": "gelu"}

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)

DROPOUT_LANES = 65536  # p is realised on a uniform 16-bit lane


@functools.lru_cache(maxsize=1)
def act2fn_names() -> tuple[str, ...]:
    """Every name of transformers' ACT2FN, sorted (imports transformers.activations once)."""
    from transformers.activations import ACT2CLS

    return tuple(sorted(ACT2CLS))


def all_activations() -> tuple[str, ...]:
    """Every accepted activation name: the fused ones, then the rest of ACT2FN, sorted."""
    return ACTIVATIONS + tuple(n for n in act2fn_names() if n not in ACTIVATION_CODES)


def canonical_activation(activation: str) -> str:
    """The name the backends receive: a fused name as is, an alias as its fused function
    ("swish" -> "silu"), any other ACT2FN name as is; a ValueError for an unknown name."""
    if activation in ACTIVATION_CODES:
        return activation
    if activation in ACTIVATION_ALIASES:
        return ACTIVATION_ALIASES[activation]
    if isinstance(activation, str) and activation in act2fn_names():
        return activation
    raise ValueError(
        f"unknown activation {activation!r}: expected {', '.join(ACTIVATIONS)} (fused) or a "
        f"name of transformers' ACT2FN: {', '.join(act2fn_names())}"
    )


def is_fused(activation: str) -> bool:
    """Whether the Triton and CUDA kernels implement `activation` (a canonical name)."""
    return activation in ACTIVATION_CODES


def check_activation(activation: str) -> str:
    """`activation` itself when the fused kernels implement it, else a ValueError."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"unknown activation {activation!r} for the fused kernels: they implement "
            f"{', '.join(ACTIVATIONS)}; every other ACT2FN name runs on the torch backend"
        )
    return activation


@functools.cache
def activation_module(activation: str, device: torch.device) -> torch.nn.Module:
    """transformers' ACT2FN[activation] on `device`, its parameters frozen at their initial
    values (prelu, xielu): LLM-Adapters freezes them too, since only parameters named
    `adapter_*` train there, and saves none of them."""
    from transformers.activations import ACT2FN

    module = ACT2FN[activation].to(device)
    module.requires_grad_(False)
    return module


def _module_activation(s: Tensor, activation: str) -> Tensor:
    module = activation_module(activation, s.device)
    if activation == "prelu":  # F.prelu does not promote: its weight in s's dtype
        return torch.nn.functional.prelu(s, module.weight.to(s.dtype))
    return module(s)


def activation_code(activation: str) -> int:
    """The kernels' integer code for `activation` (a clear error for an unknown name)."""
    return ACTIVATION_CODES[check_activation(activation)]


def apply_activation(s: Tensor, activation: str) -> Tensor:
    """φ(S) for a canonical name (`canonical_activation`). Returns S itself for identity
    (callers must not mutate the result in place); differentiable by autograd."""
    if activation == "identity":
        return s
    if activation == "tanh":
        return torch.tanh(s)
    if activation == "relu":
        return torch.relu(s)
    if activation == "gelu":  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
        return torch.nn.functional.gelu(s)
    if activation == "silu":
        return torch.nn.functional.silu(s)
    return _module_activation(s, activation)  # any other ACT2FN name: transformers' module


def activation_grad(s: Tensor, activation: str) -> Tensor | None:
    """φ'(S); None for identity (the caller skips the multiply)."""
    if activation == "identity":
        return None
    if activation == "tanh":
        t = torch.tanh(s)
        return 1.0 - t * t
    if activation == "relu":
        return (s > 0).to(s.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(s * _INV_SQRT2))
        pdf = torch.exp(-0.5 * s * s) * _INV_SQRT2PI
        return cdf + s * pdf
    if activation == "silu":
        sig = torch.sigmoid(s)
        return sig * (1.0 + s * (1.0 - sig))
    # any other ACT2FN name: autograd through transformers' module (every ACT2FN activation is
    # elementwise, so the gradient of the sum is φ' elementwise)
    with torch.enable_grad():
        leaf = s.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_module_activation(leaf, activation).sum(), leaf)
    return grad


def dropout_threshold(p: float) -> tuple[int, float]:
    """(threshold t on a uniform 16-bit lane, 1 / realised keep probability): an element is
    kept when its lane is >= t = round(p * 65536), clipped to [0, 65535]."""
    t = int(round(p * DROPOUT_LANES))
    t = min(max(t, 0), DROPOUT_LANES - 1)
    return t, DROPOUT_LANES / (DROPOUT_LANES - t)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the rank-sized intermediates: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def m_bucket(m: int) -> int:
    """M rounded up to a power of two, at least 16: kernels retune, and backend tables look up,
    per power of two of the token count, not per batch shape."""
    return 1 << max(int(m) - 1, 15).bit_length()


def fp32_ieee(dtype: torch.dtype) -> bool:
    """Whether float32 products must be full IEEE float32: for float32 operands unless the user
    allowed TF32 (`torch.backends.cuda.matmul.allow_tf32`, off by default), as torch's own
    matmul does. Half-precision operands run on the tensor cores either way."""
    return dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
