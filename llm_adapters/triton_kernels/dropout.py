"""The dropout keep-mask shared by every Triton kernel (and mirrored by the CUDA backend).

Definition, for a 2-D activation [M, K] (row-major) and a 64-bit seed:
    i     = row * K + col                       (the element's linear index, taken mod 2**32)
    u     = philox4x32-10(key=seed, counter=(i, 0, 0, 0))[0]      == tl.randint(seed, i)
    keep  = (u >> 16) >= t,   t = round(p * 65536) clipped to [0, 65535]
    scale = 65536 / (65536 - t)
The 16-bit threshold realises p to 1/65536, the same quantisation as the torch backend, so
every backend drops the same fraction and scales kept values the same way; the masks
themselves differ between the torch backend (torch's generator) and the GPU backends (Philox).
Nothing is stored: each kernel regenerates the bits it needs from (seed, i).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._numerics import dropout_threshold


@triton.jit
def keep_bits(seed, offsets, threshold):
    """True where an element with linear index `offsets` is kept."""
    r = tl.randint(seed, offsets.to(tl.uint32))
    return (r >> 16) >= threshold


@triton.jit
def _keep_mask_kernel(out_ptr, numel, seed, threshold, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    keep = keep_bits(seed, offs, threshold)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=inside)


def keep_mask(shape: tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The bool keep-mask the Triton kernels use for `seed` on a 2-D input of `shape`."""
    numel = 1
    for d in shape:
        numel *= int(d)
    t, _ = dropout_threshold(p)
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        block = 1024
        _keep_mask_kernel[(triton.cdiv(numel, block),)](out, numel, int(seed), t, BLOCK=block)
    return out.view(shape).bool()
