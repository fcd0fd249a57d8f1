"""Triton kernels for mixed-adapter LoRA batches (SGMV style, as Punica / S-LoRA), inference only.

    y[i] += s_a · (x[i] A_aᵀ) B_aᵀ      a = adapter_index[i]; rows with a = -1 get nothing

Host side (`grouped_lora_add`): one stable sort of the adapter index and the segment
offsets (`seg[g]` = first sorted position of adapter g, `seg[G]` = M); the adapters' A are
stacked into one zero-padded buffer [G, r_max, K] and their B into [G, N, r_max] (the padding
contributes exact zeros, so ranks may differ); the scalings into an fp32 [G] tensor. No host
synchronisation: the row blocks are found in the kernel.

Kernels (each ONE launch over all segments):
  `_grouped_shrink_kernel`  S[p] = x[order[p]] A_aᵀ, fp32 [M, r_max] in sorted order.
  `_grouped_expand_kernel`  y[order[p]] = y0[order[p]] + s_a · S[p] B_aᵀ, in place (y is y0).
Grid axis 0 runs over the row blocks of all segments: segment g has cdiv(len_g, BLOCK_M) of
them, and there are at most cdiv(M, BLOCK_M) + G, the size of the axis. A program finds its
segment from the cumulative block counts (a [BLOCK_G] vector: G + 1 offsets loaded once), so a
block never mixes two adapters; the programs past the last block store nothing. Rows are
gathered through `order` (x and y0 are read at their original rows, y written there): no
sorted copy of x or y. Base rows (-1) sort first and belong to no segment: not read, not
written. Accumulation in fp32; offsets in int64.

Nothing here imports ops, layers or models (DESIGN §1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._numerics import fp32_ieee, m_bucket
from . import _limits
from ._common import INTERPRET as _INTERPRET
from ._common import dot, loop_bound

_MAX_R_SHRINK = 128  # rank columns per shrink program (a [BLOCK_M, BLOCK_R] accumulator)
_MAX_R_CHUNK = 64  # rank chunk of the expand's loop (S and B tiles next to the accumulator)


def _shrink_configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16})]
    # Compiled for sm_90 (triton 3.8) with no register spills in half precision at r_max 16 and
    # 128; float32 (FMA) keeps the ones `_fma_fits` passes. The first fits both targets'
    # shared memory for half precision (the AUTOTUNE=0 choice); 16-row blocks serve decode
    # batches, where a segment holds a few rows.
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=st, num_warps=w)
        for bm, bk, st, w in [(64, 64, 4, 4), (32, 128, 4, 8), (16, 64, 4, 4)]
    ]


def _expand_configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    # no spills on sm_90 in half precision at rank chunks 16 and 64 (float32: `_fma_fits`)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=st, num_warps=w)
        for bm, bn, st, w in [(64, 128, 3, 8), (32, 128, 3, 8), (32, 64, 3, 4), (16, 64, 2, 4)]
    ]


def _smem_model(kernel: str, cfg: triton.Config, nargs: dict, cc: int) -> int:
    """Upper bound of the shared memory the compiled `kernel` allocates with `cfg` (every
    pipelined loop taken to buffer num_stages copies of its tiles), as `lora._smem_model`."""
    del cc
    kw, st = cfg.kwargs, cfg.num_stages
    br = nargs["BLOCK_R"]
    if kernel == "_grouped_shrink_kernel":
        bm, bk = kw["BLOCK_M"], kw["BLOCK_K"]
        ex, ea = nargs["x_ptr"].element_size(), nargs["a_ptr"].element_size()
        return st * (bm * bk * ex + bk * br * ea)
    if kernel == "_grouped_expand_kernel":
        bm, bn = kw["BLOCK_M"], kw["BLOCK_N"]
        eb = nargs["b_ptr"].element_size()
        # the r loop's S (fp32) and B tiles, plus a layout conversion of the fp32 accumulator
        return st * (bm * br * 4 + br * bn * eb) + bm * bn * 4
    raise KeyError(kernel)


def _fma_fits(kernel: str, cfg: triton.Config, nargs: dict) -> bool:
    """IEEE fp32 products run on FMA, the tiles in registers: the configs that compiled for
    sm_90 without spills (triton 3.8; the others spilled 32 to 1,400 B a thread), as tile
    elements per thread. The shrink's x tile is a gather (a pointer per element): at most 16
    of it and 72 of x and A together; the expand's S, B and accumulator tiles: at most 56."""
    if not nargs.get("IEEE"):
        return True
    kw, br = cfg.kwargs, nargs["BLOCK_R"]
    threads = 32 * cfg.num_warps
    bm = kw["BLOCK_M"]
    if kernel == "_grouped_shrink_kernel":
        bk = kw["BLOCK_K"]
        return bm * bk <= 16 * threads and bm * bk + bk * br <= 72 * threads
    bn = kw["BLOCK_N"]
    return bm * br + br * bn + bm * bn <= 56 * threads


def _prune(kernel: str):
    """early_config_prune: the configs that fit the device's shared memory (`_limits.choose`),
    of those `_fma_fits` keeps; `target` / `autotune` override the device and environment."""

    def prune(configs, named_args, target=None, autotune=None, **kwargs):
        nargs = {**named_args, **kwargs}
        configs = [c for c in configs if _fma_fits(kernel, c, nargs)] or list(configs)
        if target is None:
            target = _limits.target_of(nargs["x_ptr"])
        return _limits.choose(
            configs, lambda c, cc: _smem_model(kernel, c, nargs, cc), target, autotune
        )

    return prune


@triton.jit
def _segment_of(seg_ptr, pid, G, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """(adapter g, first sorted row, end row) of row block `pid`; g == G past the last block
    (then first == end: no rows)."""
    offs_g = tl.arange(0, BLOCK_G)
    g_in = offs_g < G
    starts = tl.load(seg_ptr + offs_g, mask=g_in, other=0)
    ends = tl.load(seg_ptr + offs_g + 1, mask=g_in, other=0)
    nblk = (ends - starts + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(nblk, 0)  # inclusive: blocks of segments 0..g
    g = tl.sum((cum <= pid).to(tl.int32), 0)
    sel = offs_g == g
    first_blk = tl.sum(tl.where(sel, cum - nblk, 0), 0)
    start = tl.sum(tl.where(sel, starts, 0), 0) + (pid - first_blk) * BLOCK_M
    end = tl.sum(tl.where(sel, ends, 0), 0)
    return g, start, end


@triton.autotune(
    configs=_shrink_configs(),
    key=["M_BUCKET", "K", "R", "G"],
    prune_configs_by={"early_config_prune": _prune("_grouped_shrink_kernel")},
)
@triton.jit
def _grouped_shrink_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ag, stride_ar, stride_ak,
    order_ptr, seg_ptr,
    s_ptr, stride_sm,
    M, K, R, G, M_BUCKET,
    IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[p, j] = Σ_k x[order[p], k] A[g, j, k] (fp32) for the sorted rows p of one row block of
    adapter g; one [BLOCK_M, BLOCK_R] tile per program."""
    pid = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    g, start, end = _segment_of(seg_ptr, pid, G, BLOCK_M, BLOCK_G)
    g = g.to(tl.int64)
    offs_p = start + tl.arange(0, BLOCK_M).to(tl.int64)
    p_in = offs_p < end
    rows = tl.load(order_ptr + offs_p, mask=p_in, other=0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    r_in = offs_r < R
    a_base = a_ptr + tl.minimum(g, G - 1) * stride_ag  # g == G: no rows, any valid adapter
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        ks = k0 + offs_k
        k_in = ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=p_in[:, None] & k_in[None, :], other=0.0,
        )
        a = tl.load(
            a_base + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
            mask=r_in[None, :] & k_in[:, None], other=0.0,
        )
        acc = dot(x, a.to(dt), acc, IEEE)
    tl.store(
        s_ptr + offs_p[:, None] * stride_sm + offs_r[None, :], acc,
        mask=p_in[:, None] & r_in[None, :],
    )


@triton.autotune(
    configs=_expand_configs(),
    key=["M_BUCKET", "N", "R", "G"],
    prune_configs_by={"early_config_prune": _prune("_grouped_expand_kernel")},
    restore_value=["y_ptr"],  # in place: each timed run starts from the base output
)
@triton.jit
def _grouped_expand_kernel(
    x_ptr,
    s_ptr, stride_sm,
    b_ptr, stride_bg, stride_bn, stride_br,
    scale_ptr,
    order_ptr, seg_ptr,
    y_ptr, stride_ym, stride_yn,
    M, N, R, G, M_BUCKET,
    IEEE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[order[p], n] += s_g · Σ_j S[p, j] B[g, n, j] for one [BLOCK_M, BLOCK_N] tile of adapter
    g's rows, in place, accumulated in fp32 from y's own values (the base output). x_ptr is
    not read: it names the activation dtype (the dtype the branch rounds to, as lora_add)."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    g, start, end = _segment_of(seg_ptr, pid, G, BLOCK_M, BLOCK_G)
    g = tl.minimum(g.to(tl.int64), G - 1)  # past the last block: no rows, any valid adapter
    offs_p = start + tl.arange(0, BLOCK_M).to(tl.int64)
    p_in = offs_p < end
    rows = tl.load(order_ptr + offs_p, mask=p_in, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_in = offs_n < N
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    ymask = p_in[:, None] & n_in[None, :]
    acc = tl.load(y_ptrs, mask=ymask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + g)
    dt = x_ptr.dtype.element_ty
    b_base = b_ptr + g * stride_bg
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    for r0 in range(0, loop_bound(R), BLOCK_R):
        rs = r0 + offs_r
        r_in = rs < R
        sp = tl.load(
            s_ptr + offs_p[:, None] * stride_sm + rs[None, :],
            mask=p_in[:, None] & r_in[None, :], other=0.0,
        )
        h = (sp * s).to(dt)
        bt = tl.load(
            b_base + offs_n[None, :] * stride_bn + rs[:, None] * stride_br,
            mask=n_in[None, :] & r_in[:, None], other=0.0,
        )
        acc = dot(h, bt.to(dt), acc, IEEE)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ymask)


def _r_block(r: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(int(r))), cap)


def stack_adapters(
    lora_as: list[Tensor], lora_bs: list[Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The adapters' A [r_g, K] and B [N, r_g] in two zero-padded buffers, A [G, r_max, K] and
    B [G, N, r_max], in `dtype` (the activations': the small weights are cast, as lora.py does).
    A server that keeps the same adapters resident may build these once and pass them to
    `grouped_lora_add_stacked`."""
    g = len(lora_as)
    k = lora_as[0].shape[1]
    n = lora_bs[0].shape[0]
    r_max = max(int(a.shape[0]) for a in lora_as)
    dev = lora_as[0].device
    a_all = torch.zeros((g, r_max, k), dtype=dtype, device=dev)
    b_all = torch.zeros((g, n, r_max), dtype=dtype, device=dev)
    for i, (a, b) in enumerate(zip(lora_as, lora_bs, strict=True)):
        a_all[i, : a.shape[0]].copy_(a)
        b_all[i, :, : b.shape[1]].copy_(b)
    return a_all, b_all


def sort_rows(adapter_index: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """(order [M] int64: row positions sorted by adapter, base rows (-1) first, stable;
    seg [G + 1] int64: seg[a] = first sorted position of adapter a, seg[G] = M). One sort and
    one binary search, shapes independent of the values (no host sync; meta tensors work)."""
    keys, order = torch.sort(adapter_index, stable=True)
    bounds = torch.arange(g + 1, dtype=keys.dtype, device=keys.device)
    return order, torch.searchsorted(keys, bounds)


def grouped_lora_add(
    y0: Tensor,
    x: Tensor,
    adapter_index: Tensor,
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scalings: list[float],
) -> Tensor:
    """y0[i] += s_a · (x[i] A_aᵀ) B_aᵀ for a = adapter_index[i] >= 0, in place; returns y0.
    Inputs validated by the caller: x [M, K] and y0 [M, N] of one float dtype on one device,
    adapter_index int64 [M] in -1..G-1, A_g [r_g, K], B_g [N, r_g], G >= 1."""
    a_all, b_all = stack_adapters(lora_as, lora_bs, x.dtype)
    scale = torch.tensor([float(s) for s in scalings], dtype=torch.float32, device=x.device)
    return grouped_lora_add_stacked(y0, x, adapter_index, a_all, b_all, scale)


def grouped_lora_add_stacked(
    y0: Tensor, x: Tensor, adapter_index: Tensor, a_all: Tensor, b_all: Tensor, scale: Tensor
) -> Tensor:
    """`grouped_lora_add` on stacked adapters (`stack_adapters`): a_all [G, r_max, K], b_all
    [G, N, r_max] (x.dtype), scale fp32 [G]. Two launches; y0 updated in place and returned."""
    m, k = x.shape
    n = y0.shape[1]
    g, r, _ = a_all.shape
    if m == 0 or n == 0 or g == 0:
        return y0
    order, seg = sort_rows(adapter_index, g)
    s_buf = torch.empty((m, r), dtype=torch.float32, device=x.device)
    ieee = fp32_ieee(x.dtype)
    bucket = m_bucket(m)
    block_g = max(2, triton.next_power_of_2(g))
    block_r = _r_block(r, _MAX_R_SHRINK)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + g, triton.cdiv(r, block_r))  # noqa: E731
    _grouped_shrink_kernel[grid](
        x, x.stride(0), x.stride(1),
        a_all, a_all.stride(0), a_all.stride(1), a_all.stride(2),
        order, seg,
        s_buf, s_buf.stride(0),
        m, k, r, g, bucket,
        IEEE=ieee, BLOCK_G=block_g, BLOCK_R=block_r,
    )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) + g, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    _grouped_expand_kernel[grid](
        x,
        s_buf, s_buf.stride(0),
        b_all, b_all.stride(0), b_all.stride(1), b_all.stride(2),
        scale,
        order, seg,
        y0, y0.stride(0), y0.stride(1),
        m, n, r, g, bucket,
        IEEE=ieee, BLOCK_G=block_g, BLOCK_R=_r_block(r, _MAX_R_CHUNK),
    )
    return y0
