"""Parity of an implementation with float64 (DESIGN §6), shared by the tests and the benchmarks.

The rule: compare with a float64 reference of the same op from the same inputs and the same
dropout keep-mask; a low-precision result may differ from it by at most about twice what the
same-dtype PyTorch computation does, plus a small floor (a rounding or so at the magnitude of
the result), so an exact PyTorch result does not demand an exact kernel. Every gradient is
checked, not only the output, and no tolerance is so large that it cannot fail.

- `lora_reference` / `series_reference`: the two ops written plainly, differentiable, in the
  dtype of the activation (the small weights cast to it, as the backends do), with an explicit
  keep-mask. Given float64 leaves they are the reference; given the inputs' own dtypes they are
  "the same computation done by PyTorch". `forward_and_grads` runs one and returns every
  gradient.
- `assert_parity`: the rule in the max norm, for tests; on failure it says where, by how much,
  and what the same-dtype error and the floor were.
- `rel_error` / `parity_verdict` / `provider_errors`: the rule in relative Frobenius norm, for
  the benchmark rows (a verdict per tensor instead of an assertion).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .harness import Case, OpSpec, Provider

Scale = Union[float, Tensor]

# φ written with torch's own functions, not the package's: the reference must not share code
# with what it checks
ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda s: s,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": F.gelu,  # exact (erf) GELU, as transformers' ACT2FN["gelu"]
    "silu": F.silu,
}

# The benchmark rows' floor and cap (relative Frobenius error, in units of the dtype's eps).
# Eager's own error on a tiny or degenerate shape can be near zero; a fused kernel summing in
# another order may then differ by a few ulps without being wrong. A wrong result is O(1).
PARITY_FLOOR_EPS = 1.0
# ... and never above this (relative): a baseline that went wrong must not make all pass.
PARITY_CAP_EPS = 1000.0
PARITY_CAP = 0.05


# --------------------------------------------------------------------------------------------
# The ops, plainly
# --------------------------------------------------------------------------------------------


def _dropped(x: Tensor, keep: Optional[Tensor], inv_keep: float) -> Tensor:
    """D(x): x where `keep` is set, times 1 / (1 - p); x itself without a mask."""
    if keep is None:
        return x
    if tuple(keep.shape) != tuple(x.shape):
        raise ValueError(f"keep-mask has shape {tuple(keep.shape)}, the input {tuple(x.shape)}")
    return x * keep.to(x.dtype) * inv_keep


def _scaled(h: Tensor, scaling: Scale) -> Tensor:
    return h * (scaling.to(h.dtype) if isinstance(scaling, Tensor) else scaling)


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def lora_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scaling: Scale = 1.0,
    activation: str = "identity",
    keep: Optional[Tensor] = None,
    inv_keep: float = 1.0,
    lora_a_bias: Optional[Tensor] = None,
    lora_b_bias: Optional[Tensor] = None,
) -> Tensor:
    """y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b in x's dtype (everything else cast to it).

    x [..., K] (flattened to M rows), weight [N, K], lora_a [r, K], lora_b [N, r]; `keep` is
    the [M, K] keep-mask of the dropout (None: no dropout) and `inv_keep` the scale of kept
    values; `scaling` a float or a 0-d tensor (the learned scale). Returns [..., N].
    """
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    s = _dropped(x2, keep, inv_keep) @ lora_a.to(dt).t()
    if lora_a_bias is not None:
        s = s + lora_a_bias.to(dt)
    y = x2 @ weight.to(dt).t()
    if bias is not None:
        y = y + bias.to(dt)
    y = y + _scaled(ACTIVATION_FNS[activation](s), scaling) @ lora_b.to(dt).t()
    if lora_b_bias is not None:
        y = y + lora_b_bias.to(dt)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def series_reference(
    h: Tensor,
    down: Tensor,
    up: Tensor,
    *,
    scaling: Scale = 1.0,
    activation: str = "identity",
    keep: Optional[Tensor] = None,
    inv_keep: float = 1.0,
    down_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
) -> Tensor:
    """z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b in h's dtype (everything else cast to it).

    h [..., N] (flattened to M rows), down [r, N], up [N, r]; `keep` the [M, N] keep-mask.
    """
    dt = h.dtype
    h2 = h.reshape(-1, h.shape[-1])
    s = _dropped(h2, keep, inv_keep) @ down.to(dt).t()
    if down_bias is not None:
        s = s + down_bias.to(dt)
    z = h2 + _scaled(ACTIVATION_FNS[activation](s), scaling) @ up.to(dt).t()
    if up_bias is not None:
        z = z + up_bias.to(dt)
    return z.reshape(h.shape)


def lora_scalar_magnitudes(
    inputs: Mapping[str, Any],
    out_grad: Tensor,
    *,
    activation: str = "identity",
    keep: Optional[Tensor] = None,
    inv_keep: float = 1.0,
) -> dict[str, float]:
    """The sums of |terms| (float64) of the LoRA gradients that can be a single number that
    cancels, to pass as `assert_parity`'s magnitude: {"scale": Σ |gB| ⊙ |φ(S)|,
    "lora_a_bias": Σ |s| |gB| ⊙ |φ'(S)|} (the second one number only at r = 1).

    inputs: "x", "lora_a", "lora_b", optional "lora_a_bias" and "scale" (missing: 1), as the
    op takes them; out_grad the gradient of the output; keep / inv_keep the dropout's.
    """
    x = inputs["x"].detach().reshape(-1, inputs["x"].shape[-1]).double()
    s = _dropped(x, keep, inv_keep) @ inputs["lora_a"].detach().double().t()
    if inputs.get("lora_a_bias") is not None:
        s = s + inputs["lora_a_bias"].detach().double()
    gb = out_grad.reshape(-1, out_grad.shape[-1]).double() @ inputs["lora_b"].detach().double()
    s.requires_grad_(True)
    phi = ACTIVATION_FNS[activation](s)
    (dphi,) = torch.autograd.grad(phi.sum(), s)
    scale = inputs.get("scale", 1.0)
    scale = abs(float(scale.detach() if isinstance(scale, Tensor) else scale))
    return {"scale": (gb.abs() * phi.detach().abs()).sum().item(),
            "lora_a_bias": (scale * gb.abs() * dphi.abs()).sum().item()}


def leaves(
    inputs: Mapping[str, Any], dtype: Optional[torch.dtype] = None, wrt: Optional[Sequence] = None
) -> dict[str, Any]:
    """Fresh autograd leaves: every tensor detached, cast to `dtype` (None: its own) and
    requiring grad when named in `wrt` (None: when the input requires grad). Others pass."""
    out: dict[str, Any] = {}
    for name, v in inputs.items():
        if isinstance(v, Tensor):
            grad = v.requires_grad if wrt is None else name in wrt
            v = v.detach().to(v.dtype if dtype is None else dtype).requires_grad_(grad)
        out[name] = v
    return out


def forward_and_grads(
    fn: Callable[..., Tensor], inputs: Mapping[str, Any], out_grad: Tensor
) -> tuple[Tensor, dict[str, Optional[Tensor]]]:
    """(fn(**inputs) detached, {name: gradient} for every input tensor that requires grad),
    backpropagating `out_grad` (cast to the output's dtype)."""
    wrt = [n for n, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad]
    out = fn(**inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in wrt], out_grad.to(out.dtype),
                                allow_unused=True)
    return out.detach(), dict(zip(wrt, grads, strict=True))


# --------------------------------------------------------------------------------------------
# The rule, for tests: max norm, verbose
# --------------------------------------------------------------------------------------------


def max_error(got: Tensor, ref: Tensor) -> float:
    """max |got - ref| in float64 (0 for empty tensors)."""
    if got.numel() == 0:
        return 0.0
    return (got.detach().double() - ref.detach().double()).abs().max().item()


def parity_tolerance(base: float, floor: float, cap: float = math.inf) -> float:
    """The DESIGN §6 bound: twice the same-dtype error plus the floor, never above `cap`."""
    return min(2.0 * base + floor, cap)


def assert_parity(
    name: str,
    got: Optional[Tensor],
    ref: Tensor,
    same: Tensor,
    *,
    rel_floor: float,
    magnitude: Optional[float] = None,
    check_dtype: bool = False,
) -> None:
    """max |got - ref| <= 2·max |same - ref| + rel_floor·magnitude, else an AssertionError
    that names the tensor, the worst element, both values, the same-dtype error and the floor.

    got: the implementation's result; ref: the float64 reference; same: the same computation
    done by PyTorch in the low-precision dtype. magnitude defaults to max |ref|; pass the sum
    of the absolute terms for a result that cancels (a learned scale's gradient). rel_floor is
    the caller's: a rounding or a few of the dtype (or of float32 accumulation). check_dtype:
    also require got's dtype to be same's.
    """
    assert got is not None, f"{name}: no result (a missing gradient?)"
    assert tuple(got.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    assert tuple(same.shape) == tuple(ref.shape), (
        f"{name}: same-dtype shape {tuple(same.shape)} != reference {tuple(ref.shape)}")
    if check_dtype:
        assert got.dtype == same.dtype, f"{name}: dtype {got.dtype} != {same.dtype}"
    got64, ref64 = got.detach().double(), ref.detach().double()
    assert torch.isfinite(got64).all(), f"{name}: non-finite values"
    if got64.numel() == 0:
        return
    diff = (got64 - ref64).abs()
    err = diff.max().item()
    base = max_error(same, ref64)
    if magnitude is None:
        magnitude = ref64.abs().max().item()
    floor = rel_floor * magnitude
    tol = parity_tolerance(base, floor)
    if not err <= tol:
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(
            f"{name}: max error {err:.3e} at {idx} (got {got64[idx].item():.6g}, "
            f"ref {ref64[idx].item():.6g}) > tolerance {tol:.3e} = 2 x PyTorch same-dtype "
            f"error {base:.3e} + floor {floor:.3e}"
        )


# --------------------------------------------------------------------------------------------
# The rule, for benchmark rows: relative Frobenius norm, a verdict per tensor
# --------------------------------------------------------------------------------------------


def rel_error(got: Optional[Tensor], ref: Optional[Tensor]) -> float:
    """||got - ref|| / ||ref|| in float64 (Frobenius); inf when a gradient is missing."""
    if ref is None:
        return 0.0 if got is None else math.inf
    if got is None or tuple(got.shape) != tuple(ref.shape):
        return math.inf
    got64, ref64 = got.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(got64).all():
        return math.inf
    denom = ref64.norm().item()
    diff = (got64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def parity_verdict(
    errors: dict[str, float], baseline: dict[str, float], dtype: torch.dtype
) -> tuple[bool, dict[str, float]]:
    """Pass when every error is within `parity_tolerance` of the baseline's (eager PyTorch in
    the same dtype) with a floor of PARITY_FLOOR_EPS ulps, and never above PARITY_CAP (so a
    broken baseline cannot make every provider pass). Returns (ok, tolerance per tensor)."""
    eps = torch.finfo(dtype).eps
    floor = PARITY_FLOOR_EPS * eps
    cap = min(PARITY_CAP_EPS * eps, PARITY_CAP)
    tol = {k: parity_tolerance(baseline.get(k, 0.0), floor, cap) for k in errors}
    ok = all(math.isfinite(e) and e <= tol[k] for k, e in errors.items())
    return ok, tol


def provider_errors(
    spec: OpSpec, case: Case, provider: Provider, tensors: dict[str, Tensor]
) -> dict[str, float]:
    """Relative errors of one forward + backward of `provider` against float64, per tensor:
    "out" and "d_<name>" for each of `spec.grad_names(case)`."""
    runner = provider.build(case, tensors)
    runner.record = True  # keep what keep_mask() needs
    runner.zero_grad()
    out = runner.forward()
    out.backward(runner.out_grad)
    mask, scale = runner.keep_mask()
    grads = runner.grads()
    names = spec.grad_names(case)
    ref64 = leaves({k: v for k, v in tensors.items() if k != "out_grad"}, torch.float64, names)
    with torch.enable_grad():
        ref_out, ref_grads = forward_and_grads(
            lambda **t: spec.reference(t, mask, scale, case), ref64, runner.out_grad)
    errors = {"out": rel_error(out, ref_out)}
    for name, g in zip(names, grads, strict=True):
        errors["d_" + name] = rel_error(g, ref_grads[name])
    runner.zero_grad()
    return errors
