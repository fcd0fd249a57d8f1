"""The Triton pieces the LoRA (`lora.py`) and series (`series.py`) kernels share.

- `INTERPRET`: the run mode. Under TRITON_INTERPRET=1 (CPU tests) the kernels run in numpy
  and each kernel keeps one small config. (The other switch, LLM_ADAPTERS_TRITON_AUTOTUNE=0,
  belongs to the config pruning: `_limits.autotune_enabled`.)
- `loop_bound(x)`: a runtime scalar as the bound of a `range` in a kernel body (see below).
- `dot(a, b, acc, IEEE)`: `tl.dot` with the float32 rule of `_numerics.fp32_ieee` (IEEE
  products for float32 unless torch allows TF32; half precision runs on the tensor cores).
- `phi(s, ACT)`, `phi_grad(s, ACT)`, `tanh(x)`: the branch non-linearity φ and φ' in float32
  for the codes of `_numerics.ACTIVATION_CODES`, matching `_numerics.apply_activation` and
  `activation_grad`.

Nothing here imports ops, layers or models (DESIGN §1).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Loop bounds. The interpreter holds every runtime scalar (a kernel argument, tl.program_id and
# anything computed from them) as a 1-element numpy array and hands it to `range` through
# `int(array)`. NumPy 2.4 turned that conversion of a 1-D array into a TypeError ("only
# 0-dimensional arrays can be converted to Python scalars"), and triton 3.6's interpreter still
# relies on it (fixed in later releases by squeezing first), so every kernel loop with a
# runtime bound failed there. A kernel writes `range(0, loop_bound(K), BLOCK_K)`: compiled, the
# bound is the scalar itself (an inlined identity, the loop stays an scf.for and is pipelined
# as before); interpreted, it is the Python int the array holds. Use it inside the `range(...)`
# call, not through a variable: the interpreter rewrites every assignment back into a tensor.
if INTERPRET:

    def loop_bound(x):
        handle = getattr(x, "handle", None)
        if handle is None:  # a Python int or a constexpr already
            return x
        if handle.data.size != 1:
            raise ValueError(f"loop_bound takes a scalar, got a block of shape {handle.data.shape}")
        return int(handle.data.reshape(-1)[0])

else:

    @triton.jit
    def loop_bound(x):
        return x


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b in float32. IEEE (from `_numerics.fp32_ieee`, float32 operands without
    allow_tf32) keeps full float32 products; otherwise float32 operands may use TF32 and half
    precision operands ignore the setting."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tanh(x):
    # Through exp, so the interpreter runs it too (no libdevice). The |x| form never overflows:
    # e = exp(-2|x|) lies in (0, 1], where 1 - 2 / (exp(2x) + 1) overflows exp for x > 44.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def phi(s, ACT: tl.constexpr):
    """φ(s) in float32 for the activation code ACT (identity, tanh, relu, erf gelu, silu)."""
    if ACT == 1:
        s = tanh(s)
    elif ACT == 2:
        s = tl.maximum(s, 0.0)
    elif ACT == 3:
        s = 0.5 * s * (1.0 + tl.erf(s * 0.7071067811865476))
    elif ACT == 4:
        s = s * tl.sigmoid(s)
    return s


@triton.jit
def phi_grad(s, ACT: tl.constexpr):
    """φ'(s) in float32 (1 for identity; relu' is 0 at 0, as in torch)."""
    if ACT == 0:
        out = tl.full(s.shape, 1.0, tl.float32)
    elif ACT == 1:
        t = tanh(s)
        out = 1.0 - t * t
    elif ACT == 2:
        out = tl.where(s > 0, 1.0, 0.0)
    elif ACT == 3:
        cdf = 0.5 * (1.0 + tl.erf(s * 0.7071067811865476))
        pdf = tl.exp(-0.5 * s * s) * 0.3989422804014327
        out = cdf + s * pdf
    else:
        sig = tl.sigmoid(s)
        out = sig * (1.0 + s * (1.0 - sig))
    return out
