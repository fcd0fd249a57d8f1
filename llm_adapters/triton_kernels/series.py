"""Series bottleneck adapter (AdapterH / AdapterP) in Triton: z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b.

Shapes: h [M, N] (hidden size N up to 16384), Dn [r, N], Up [N, r], bottleneck r in 1..1024.
Contract (argument order, dtypes, empty tensors for unneeded grads): `ops/_backend.py`.

Reference and memory traffic (eager PyTorch, M rows, bytes of h's dtype):
    hd = dropout(h)                 read MN, write MN (plus a stored mask)
    S = hd @ Dn.T + d_b             read MN
    A = φ(S)                        rank-sized
    z = h + s * (A @ Up.T) + u_b    write MN (A @ Up.T), read 2 MN, write MN
Forward kernel here: one program per [BM, N] row block. Pass 1 walks the row in BN-wide chunks
accumulating S in fp32 (dropout regenerated from the Philox seed, never stored); pass 2 walks
it again, re-reading h and writing z. The re-read is meant to hit L2 (the row block was just
read; BM is tuned with that in mind), giving the DRAM floor: read MN, write MN. Saved for
backward: S only ([M, r] fp32).

Backward, g = dL/dz:
    GU = g Up [M, r];   dS = s·GU ⊙ φ'(S);   d(scale) = Σ GU ⊙ φ(S);   d_b grad = Σ_m dS
    dh = g + D'(dS Dn)          (row-block kernel: pass 1 computes GU, pass 2 re-reads g, writes dh)
    dDn = dSᵀ D(h),  dUp = s·gᵀ φ(S),  u_b grad = Σ_m g   (column-tile kernel, reads g and h)
DRAM traffic: g twice, h once, dh once. The floor (g once) would need the [r, N] weight
gradients reduced across row blocks with atomics; we keep the backward deterministic instead:
the column-tile kernel splits M into a few chunks whose fp32 partials are summed in a fixed
order. When only dh is needed (frozen adapter) the backward reads g once and writes dh once.

Autotuning: each kernel times a few configs the first time it sees an (N, r, dtype) key;
LLM_ADAPTERS_TRITON_AUTOTUNE=0 skips that and uses one default config (one compile per key).

Dropout: the keep-mask of element (m, n) is `keep_bits(seed, m * N + n, t)` from `dropout.py`,
identical to `dropout.keep_mask((M, N), p, seed)`; kept values are scaled by 65536 / (65536 - t).
The scaling is applied to the rank-sized products, never to h.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._numerics import (
    activation_code,
    check_activation,
    dropout_threshold,
    fp32_ieee,
)
from . import _limits
from ._common import INTERPRET as _INTERPRET
from ._common import dot, loop_bound, phi, phi_grad
from .dropout import keep_bits

# Largest bottleneck kept in registers as one tile. S [BM, r] in fp32 plus the [BN, r] weight
# tile bound the register budget; above this r is tiled (correct, not tuned for speed). Lower
# under the interpreter so that CPU tests with r = 256 reach the tiled path.
_MAX_BLOCK_R = 64 if _INTERPRET else 256


def _configs(kernel: str, interpret: bool = _INTERPRET) -> list[triton.Config]:
    """Autotuning space. Under the interpreter one small config (speed is meaningless there
    and every config would be run for timing). On sm_80 / sm_90 the row-block kernels trade a
    large BM (fewer re-reads of the weights, bigger tensor-core tiles) against a small one (the
    [BM, N] row block must still be in L2 when pass 2 re-reads it, and S [BM, r] must fit in
    registers); BM = 16 keeps a 16384-wide bf16 row block at 512 KiB. Configs whose pipelined
    tiles overflow shared memory for the actual r and dtypes are pruned by `_prune`."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)]
    # Few configs on purpose: each costs a compile (10-60 s of ptxas for these kernels) per
    # (N, r, dtype) key the first time a shape is seen.
    if kernel == "rows":
        shapes = [
            (16, 64, 4, 2),  # fits any r <= 256 with fp32 weights on an A100
            (32, 64, 4, 2),
            (32, 64, 4, 3),
            (32, 128, 4, 3),
            (64, 64, 8, 3),
            (128, 64, 8, 3),  # fewest weight re-reads (each row block streams Dn and Up once)
        ]
    else:
        shapes = [
            (16, 64, 4, 2),  # fits r = 256 with fp32 activations on an A100
            (32, 64, 4, 2),
            (64, 64, 4, 3),
            (64, 128, 8, 3),
            (32, 64, 8, 2),  # BR = 256: 128 fp32 accumulators per thread (4 warps spill)
            (16, 32, 8, 2),  # BR = 256 with IEEE fp32 (FMA): 64 per thread
        ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in shapes
    ]


def _smem_model(kernel: str, config: triton.Config, nargs: dict, cc: int) -> int:
    """Bytes of shared memory `kernel` compiled with `config` allocates on compute capability
    `cc`, from its launch arguments (`nargs`: pointers and constexprs by name), as an upper
    bound: pipelined loads are counted num_stages deep. Per stage the row-block
    kernels buffer an activation tile [BM, BN] and a weight tile [BN, BR] (weights already in
    the activations' dtype), plus S or dS tiles [BM, BR] (fp32) when r is tiled, and one fp32
    [BM, BN] tile (a layout conversion: 16 KB at 64x64, r = 256, sm_90); the weight-gradient
    kernel g and h [BM, BN] and dS and S [BM, BR] in fp32, with dropout one more [BM, BN]."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    block_r = nargs["BLOCK_R"]
    # num_stages buffers on both targets: an upper bound (sm_80 and the kernels without wgmma
    # keep num_stages - 1), so one rule holds for every compile `aot` checks
    del cc
    buf = config.num_stages
    if kernel == "_series_backward_weights_kernel":
        act = nargs["g_ptr"].element_size()
        per_stage = 2 * bm * bn * act + 2 * bm * block_r * 4
        extra = bm * bn * act if nargs.get("HAS_DROPOUT") else 0
    else:
        act = nargs.get("h_ptr", nargs.get("g_ptr")).element_size()
        per_stage = bm * bn * act + bn * block_r * nargs["dn_ptr"].element_size()
        extra = bm * bn * 4 + (buf * bm * block_r * 4 if not nargs["ONE_R_TILE"] else 0)
    return buf * per_stage + extra


# Tried first when LLM_ADAPTERS_TRITON_AUTOTUNE=0 (taken if it fits sm_80 and sm_90).
_DEFAULT = {"rows": (32, 64, 4, 3), "weights": (64, 64, 4, 3)}


def _accumulators_fit(kernel: str, config: triton.Config, nargs: dict) -> bool:
    """Whether the fp32 accumulators and tiles fit in registers (rules from AOT compiles of
    every config, sm_80 and sm_90). IEEE fp32 compiles to FMA: the [BM, BR] accumulator (the
    [BR, BN] and [BN, BR] ones in the weight gradient) within 64 per thread, and rows: 16 from
    BR = 64, weights: 32 below BR = 128, else 16 (more spilled up to 30 KB; 64 rows at BR = 16
    1,072 B). With tensor cores the row kernels' S or dS [BM, BR] within 64 per thread (128
    rows at BR = 256 spilled 2.9 KB), and the weight gradient's accumulators and [BM, BR],
    [BM, BN] tiles (2 each) within 160 (past it 0.5-2.4 KB spilled; within, at most 128 B).
    (16, 64, 4, 2) passes every row rule, (16, 32, 8, 2) every weight one: none is left empty."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    br, threads = nargs["BLOCK_R"], 32 * config.num_warps
    weights = kernel == "_series_backward_weights_kernel"
    if not nargs.get("IEEE"):
        words = 2 * (br * bn + bm * br + bm * bn) if weights else bm * br
        return words <= (160 if weights else 64) * threads
    acc, rows = (2 * br * bn, 32 if br < 128 else 16) if weights else (bm * max(br, bn), 16)
    return acc <= 64 * threads and ((bm <= rows) if weights else (br < 64 or bm <= rows))


def _prune(kernel: str):
    """early_config_prune for `kernel`: the configs `_smem_model` fits in the device's shared
    memory, or the one LLM_ADAPTERS_TRITON_AUTOTUNE=0 takes (`_limits.choose`, trying
    `_DEFAULT` first). `target` ((cc, limit)) and `autotune` override the device and the
    environment (used by `aot`)."""
    default = _DEFAULT["weights" if kernel == "_series_backward_weights_kernel" else "rows"]

    def key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    def prune(configs, named_args, target=None, autotune=None, **kwargs):
        nargs = {**named_args, **kwargs}
        if target is None:
            target = _limits.target_of(nargs.get("h_ptr", nargs.get("g_ptr")))
        configs = [c for c in configs if _accumulators_fit(kernel, c, nargs)] or list(configs)
        ordered = sorted(configs, key=lambda c: key(c) != default)
        return _limits.choose(
            ordered, lambda c, cc: _smem_model(kernel, c, nargs, cc), target, autotune
        )

    return prune


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _shrink_tile(
    h_ptr, dn_ptr, db_ptr, rows, row_ok, r0, N, R, stride_dn_r, stride_dn_n,
    seed, threshold, inv_keep,
    HAS_DB: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """S[:, r0:r0+BR] = D(h[rows]) Dn[r0:r0+BR]ᵀ (+ d_b) in fp32, walking N in BN chunks."""
    dt = h_ptr.dtype.element_ty
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, loop_bound(N), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(h_ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_bits(seed, offs, threshold), x, 0.0)
        # Dn tile read as [BN, BR] (Dnᵀ); adapter weights are cast to h's dtype, h never upcast.
        w = tl.load(
            dn_ptr + rr[None, :] * stride_dn_r + cols[:, None] * stride_dn_n,
            mask=col_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(dt)
        acc = dot(x, w, acc, IEEE)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    if HAS_DB:
        acc += tl.load(db_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _residual_expand(
    res_ptr, out_ptr, lhs, lhs_ptr, w_ptr, stride_w_r, stride_w_n, bias_ptr,
    rows, row_ok, N, R, scale, seed, threshold, inv_keep,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ONE_R_TILE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[rows] = res[rows] + scale · D'(L W) (+ bias), walking N in BN chunks, fp32 sums.

    The second pass of both row-block kernels: forward z = h + s·φ(S) Upᵀ + u_b, backward
    dh = g + D'(dS Dn) (scale 1). L [BM, R] is the rank-sized factor, W [R, N] the weight
    (element (j, n) at j·stride_w_r + n·stride_w_n, cast to res's dtype). ONE_R_TILE: L is
    `lhs`, held in registers in res's dtype; otherwise L = φ(lhs_ptr[rows]), read back from
    the [M, R] fp32 buffer BR columns at a time. D' (HAS_DROPOUT) keeps the elements whose
    keep bits of m·N + n are set, scaled by inv_keep. res is re-read per chunk (from cache)."""
    dt = res_ptr.dtype.element_ty
    for n0 in range(0, loop_bound(N), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if ONE_R_TILE:
            rr = tl.arange(0, BLOCK_R)
            w = tl.load(
                w_ptr + rr[:, None] * stride_w_r + cols[None, :] * stride_w_n,
                mask=(rr < R)[:, None] & col_ok[None, :],
                other=0.0,
            ).to(dt)
            acc = dot(lhs, w, acc, IEEE)
        else:
            for r0 in range(0, loop_bound(R), BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < R
                pre = tl.load(
                    lhs_ptr + rows[:, None] * R + rr[None, :],
                    mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0,
                )
                w = tl.load(
                    w_ptr + rr[:, None] * stride_w_r + cols[None, :] * stride_w_n,
                    mask=r_ok[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(dt)
                acc = dot(phi(pre, ACT).to(dt), w, acc, IEEE)
        offs = rows[:, None] * N + cols[None, :]
        io_mask = row_ok[:, None] & col_ok[None, :]
        if HAS_DROPOUT:
            acc = tl.where(keep_bits(seed, offs, threshold), acc * inv_keep, 0.0)
        z = tl.load(res_ptr + offs, mask=io_mask, other=0.0).to(tl.float32) + scale * acc
        if HAS_BIAS:
            z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs, z.to(dt), mask=io_mask)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_configs("rows"),
    key=["N", "R"],
    prune_configs_by={"early_config_prune": _prune("_series_forward_kernel")},
)
@triton.jit
def _series_forward_kernel(
    h_ptr, dn_ptr, up_ptr, db_ptr, ub_ptr, scale_ptr, z_ptr, s_ptr,
    M, N, R,
    stride_dn_r, stride_dn_n, stride_up_n, stride_up_r,
    scaling, seed, threshold, inv_keep,
    ACT: tl.constexpr, HAS_DB: tl.constexpr, HAS_UB: tl.constexpr,
    HAS_SCALE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_R_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    dt = h_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if HAS_SCALE_T:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scaling

    if ONE_R_TILE:
        # Pass 1: S for the whole bottleneck stays in registers.
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        pre = _shrink_tile(
            h_ptr, dn_ptr, db_ptr, rows, row_ok, 0, N, R, stride_dn_r, stride_dn_n,
            seed, threshold, inv_keep, HAS_DB, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        )
        tl.store(s_ptr + rows[:, None] * R + rr[None, :], pre, mask=row_ok[:, None] & r_ok[None, :])
        a = phi(pre, ACT).to(dt)
    else:
        # Large bottleneck: S is built one r tile at a time (h re-read per tile), written to
        # s_pre, and read back tile by tile in pass 2.
        for r0 in range(0, loop_bound(R), BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            pre = _shrink_tile(
                h_ptr, dn_ptr, db_ptr, rows, row_ok, r0, N, R, stride_dn_r, stride_dn_n,
                seed, threshold, inv_keep, HAS_DB, HAS_DROPOUT, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
            )
            tl.store(
                s_ptr + rows[:, None] * R + rr[None, :], pre, mask=row_ok[:, None] & r_ok[None, :]
            )
        # s_pre was written by other threads of this program: make it visible before reading.
        tl.debug_barrier()
        a = 0.0  # unused: pass 2 reads S back from s_pre
    # Pass 2: z = h + s·φ(S) Upᵀ + u_b, one BN chunk at a time (h re-read from cache).
    _residual_expand(
        h_ptr, z_ptr, a, s_ptr, up_ptr, stride_up_r, stride_up_n, ub_ptr,
        rows, row_ok, N, R, s, seed, threshold, inv_keep,
        ACT, HAS_UB, False, ONE_R_TILE, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
    )


@triton.jit
def _grad_s_tile(
    g_ptr, up_ptr, s_ptr, rows, row_ok, r0, N, R, stride_up_n, stride_up_r, s,
    ACT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """(dS, GU ⊙ φ(S)) for columns r0:r0+BR of the bottleneck, both [BM, BR] fp32."""
    dt = g_ptr.dtype.element_ty
    rr = r0 + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    gu = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, loop_bound(N), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        gt = tl.load(
            g_ptr + rows[:, None] * N + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        u = tl.load(
            up_ptr + cols[:, None] * stride_up_n + rr[None, :] * stride_up_r,
            mask=col_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(dt)
        gu = dot(gt, u, gu, IEEE)
    pre = tl.load(
        s_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0
    )
    ds = s * gu * phi_grad(pre, ACT)
    return ds, gu * phi(pre, ACT)


@triton.autotune(
    configs=_configs("rows"),
    key=["N", "R"],
    prune_configs_by={"early_config_prune": _prune("_series_backward_rows_kernel")},
)
@triton.jit
def _series_backward_rows_kernel(
    g_ptr, up_ptr, dn_ptr, s_ptr, scale_ptr, ds_ptr, dscale_ptr, dh_ptr,
    M, N, R,
    stride_dn_r, stride_dn_n, stride_up_n, stride_up_r,
    scaling, seed, threshold, inv_keep,
    ACT: tl.constexpr, HAS_SCALE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DS: tl.constexpr, NEED_DH: tl.constexpr, NEED_SCALE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, ONE_R_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Per row block: GU = g Up, dS (stored, fp32), per-row Σ_r GU⊙φ(S), and
    dh = g + D'(dS Dn) (g re-read from cache)."""
    dt = g_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    if HAS_SCALE_T:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scaling
    dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)

    if ONE_R_TILE:
        rr = tl.arange(0, BLOCK_R)
        r_ok = rr < R
        ds, gh = _grad_s_tile(
            g_ptr, up_ptr, s_ptr, rows, row_ok, 0, N, R, stride_up_n, stride_up_r, s,
            ACT, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        )
        if NEED_SCALE:
            dscale += tl.sum(gh, axis=1)
        if NEED_DS:
            tl.store(
                ds_ptr + rows[:, None] * R + rr[None, :], ds, mask=row_ok[:, None] & r_ok[None, :]
            )
        ds_lo = ds.to(dt)
    else:
        for r0 in range(0, loop_bound(R), BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            ds, gh = _grad_s_tile(
                g_ptr, up_ptr, s_ptr, rows, row_ok, r0, N, R, stride_up_n, stride_up_r, s,
                ACT, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
            )
            if NEED_SCALE:
                dscale += tl.sum(gh, axis=1)
            tl.store(
                ds_ptr + rows[:, None] * R + rr[None, :], ds, mask=row_ok[:, None] & r_ok[None, :]
            )
        if NEED_DH:
            # dS was written by other threads of this program: make it visible first.
            tl.debug_barrier()
        ds_lo = 0.0  # unused: dh reads dS back from ds_ptr
    if NEED_DH:
        _residual_expand(
            g_ptr, dh_ptr, ds_lo, ds_ptr, dn_ptr, stride_dn_r, stride_dn_n, g_ptr,
            rows, row_ok, N, R, 1.0, seed, threshold, inv_keep,
            0, False, HAS_DROPOUT, ONE_R_TILE, IEEE, BLOCK_M, BLOCK_N, BLOCK_R,
        )
    if NEED_SCALE:
        tl.store(dscale_ptr + rows, dscale, mask=row_ok)


@triton.autotune(
    configs=_configs("weights"),
    key=["N", "R"],
    prune_configs_by={"early_config_prune": _prune("_series_backward_weights_kernel")},
)
@triton.jit
def _series_backward_weights_kernel(
    g_ptr, h_ptr, s_ptr, ds_ptr, scale_ptr, ddn_ptr, dup_ptr, dub_ptr,
    M, N, R, ROWS_PER_SPLIT,
    scaling, seed, threshold, inv_keep,
    ACT: tl.constexpr, HAS_SCALE_T: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NEED_DOWN: tl.constexpr, NEED_UP: tl.constexpr, NEED_UB: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial sums over one chunk of rows, for one [BR, BN] tile:
    dDn = dSᵀ D(h) [R, N], dUp = s·gᵀ φ(S) [N, R] and u_b grad = Σ_m g [N], all fp32.
    Partial p of each lives at offset p·(its size); the launcher sums them in order."""
    dt = g_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < R
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, M)

    ddn = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    dup = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    dub = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(loop_bound(row_start), loop_bound(row_end), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        offs = rows[:, None] * N + cols[None, :]
        io_mask = row_ok[:, None] & col_ok[None, :]
        rmask = row_ok[:, None] & r_ok[None, :]
        if NEED_DOWN:
            x = tl.load(h_ptr + offs, mask=io_mask, other=0.0)
            if HAS_DROPOUT:
                x = tl.where(keep_bits(seed, offs, threshold), x, 0.0)
            ds = tl.load(ds_ptr + rows[:, None] * R + rr[None, :], mask=rmask, other=0.0)
            ddn = dot(tl.trans(ds.to(dt)), x, ddn, IEEE)
        if NEED_UP or NEED_UB:
            gt = tl.load(g_ptr + offs, mask=io_mask, other=0.0)
            if NEED_UP:
                pre = tl.load(s_ptr + rows[:, None] * R + rr[None, :], mask=rmask, other=0.0)
                a = phi(pre, ACT).to(dt)
                dup = dot(tl.trans(gt), a, dup, IEEE)
            if NEED_UB:
                dub += tl.sum(gt.to(tl.float32), axis=0)
    if NEED_DOWN:
        if HAS_DROPOUT:
            ddn = ddn * inv_keep
        base = pid_s * R * N
        tl.store(
            ddn_ptr + base + rr[:, None] * N + cols[None, :],
            ddn,
            mask=r_ok[:, None] & col_ok[None, :],
        )
    if NEED_UP:
        if HAS_SCALE_T:
            s = tl.load(scale_ptr).to(tl.float32)
        else:
            s = scaling
        base = pid_s * N * R
        tl.store(
            dup_ptr + base + cols[:, None] * R + rr[None, :],
            dup * s,
            mask=col_ok[:, None] & r_ok[None, :],
        )
    if NEED_UB:
        tl.store(dub_ptr + pid_s * N + cols, dub, mask=col_ok & (pid_r == 0))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_r(r: int) -> int:
    # tl.dot needs every dimension >= 16. Above _MAX_BLOCK_R the bottleneck is tiled; smaller
    # tiles there keep the pipelined weight tiles within an A100's shared memory.
    if r > _MAX_BLOCK_R:
        return _MAX_BLOCK_R // 2
    return max(16, triton.next_power_of_2(r))


def _splits(m: int, n: int, r: int, block_r: int, device: torch.device) -> int:
    """How many row chunks the weight-gradient kernel reduces separately. More chunks fill
    more SMs but cost a [chunks, r, N] fp32 partial buffer and a final sum."""
    if _INTERPRET:
        return 1 if m < 64 else 2  # exercises the partial-sum path on small shapes
    # off a GPU (ahead-of-time enumeration on meta tensors) an H100's count stands in
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(n, 64) * triton.cdiv(r, block_r)
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, triton.cdiv(m, 256), 8))


def _device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dropout_args(p: float) -> tuple[bool, int, float]:
    if p > 0.0:
        t, inv_keep = dropout_threshold(p)
        return True, t, inv_keep
    return False, 0, 1.0


def _check(h: torch.Tensor, down: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D [M, N], got shape {tuple(h.shape)}")
    n = h.shape[1]
    r = down.shape[0] if down.dim() == 2 else -1
    if down.dim() != 2 or down.shape[1] != n or r < 1:
        raise ValueError(f"down has shape {tuple(down.shape)}, expected [r >= 1, {n}]")
    if tuple(up.shape) != (n, r):
        raise ValueError(f"up has shape {tuple(up.shape)}, expected [{n}, {r}]")
    check_activation(activation)


def series_forward(h, down, up, down_bias, up_bias, scale_t, scaling, p, seed, activation):
    """z = h + s·φ(D(h) Dnᵀ + d_b) Upᵀ + u_b.

    h [M, N] fp32/fp16/bf16 (float64 runs in PyTorch); down [r, N], up [N, r] in any float
    dtype and strides (cast to h's dtype tile by tile); down_bias [r] | None; up_bias [N] | None;
    scale_t: 0-dim learned scale (read in the kernel) | None, then the float `scaling`;
    p: dropout probability on the shrink input; seed: int (Philox key).
    Returns (z [M, N] h.dtype, s_pre [M, r] fp32 (fp64 for fp64 h), empty bool mask): the
    mask is regenerated from the seed in backward.
    """
    _check(h, down, up, activation)
    h = h.contiguous()
    # Every row block streams both weight matrices through L2: cast them to h's dtype once
    # here (r·N elements, the same rounding as a cast in the kernel) to halve that traffic when
    # they are fp32 and h is half precision.
    down, up = down.to(h.dtype), up.to(h.dtype)
    m, n = h.shape
    r = down.shape[0]
    z = torch.empty_like(h)
    s_pre = torch.empty((m, r), dtype=torch.float32, device=h.device)
    mask = h.new_empty(0, dtype=torch.bool)
    if m == 0:
        return z, s_pre, mask
    has_dropout, threshold, inv_keep = _dropout_args(p)
    block_r = _block_r(r)
    dummy = s_pre  # never read when the matching HAS_* flag is off
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    with _device_of(h):
        _series_forward_kernel[grid](
            h, down, up,
            down_bias if down_bias is not None else dummy,
            up_bias if up_bias is not None else dummy,
            scale_t if scale_t is not None else dummy,
            z, s_pre,
            m, n, r,
            down.stride(0), down.stride(1), up.stride(0), up.stride(1),
            float(scaling), int(seed), threshold, inv_keep,
            ACT=activation_code(activation),
            HAS_DB=down_bias is not None,
            HAS_UB=up_bias is not None,
            HAS_SCALE_T=scale_t is not None,
            HAS_DROPOUT=has_dropout,
            IEEE=fp32_ieee(h.dtype),
            BLOCK_R=block_r,
            ONE_R_TILE=block_r >= r,
        )
    return z, s_pre, mask


def series_backward(g, h, down, up, scale_t, scaling, p, seed, activation, s_pre, mask, needs):
    """Gradients of `series_forward` from g = dL/dz [M, N].

    needs = (dh, ddown, dup, ddown_bias, dup_bias, dscale) booleans. Returns 6 tensors in that
    order: dh [M, N] in g.dtype; ddown [r, N], dup [N, r], ddown_bias [r], dup_bias [N] and
    dscale (0-dim) in fp32 (fp64 for fp64 g); an empty [0] tensor where not needed.
    `mask` is ignored (empty: this backend regenerates the dropout mask from `seed`).
    Deterministic: every reduction runs in a fixed order, no atomics.
    """
    _check(h, down, up, activation)
    needs = tuple(bool(x) for x in needs)
    need_dh, need_down, need_up, need_db, need_ub, need_scale = needs
    g = g.contiguous()
    h = h.contiguous()
    s_pre = s_pre.contiguous()
    down, up = down.to(g.dtype), up.to(g.dtype)  # as in series_forward
    m, n = h.shape
    r = down.shape[0]
    f32 = torch.float32
    empty = lambda: g.new_empty(0, dtype=f32)  # noqa: E731  (outputs must not alias)
    dh = torch.empty_like(g) if need_dh else g.new_empty(0)
    if m == 0:
        zeros = lambda *shape: torch.zeros(shape, dtype=f32, device=g.device)  # noqa: E731
        return (
            dh if need_dh else g.new_empty(0),
            zeros(r, n) if need_down else empty(),
            zeros(n, r) if need_up else empty(),
            zeros(r) if need_db else empty(),
            zeros(n) if need_ub else empty(),
            zeros() if need_scale else empty(),
        )
    has_dropout, threshold, inv_keep = _dropout_args(p)
    block_r = _block_r(r)
    one_r_tile = block_r >= r
    ieee = fp32_ieee(g.dtype)
    need_ds = need_dh or need_down or need_db
    scale_arg = scale_t if scale_t is not None else s_pre

    ds = torch.empty((m, r), dtype=f32, device=g.device) if need_ds or not one_r_tile else empty()
    dscale_rows = torch.empty(m, dtype=f32, device=g.device) if need_scale else empty()
    if need_ds or need_scale:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
        with _device_of(g):
            _series_backward_rows_kernel[grid](
                g, up, down, s_pre, scale_arg, ds if ds.numel() else s_pre, dscale_rows, dh,
                m, n, r,
                down.stride(0), down.stride(1), up.stride(0), up.stride(1),
                float(scaling), int(seed), threshold, inv_keep,
                ACT=activation_code(activation),
                HAS_SCALE_T=scale_t is not None,
                HAS_DROPOUT=has_dropout,
                NEED_DS=need_ds,
                NEED_DH=need_dh,
                NEED_SCALE=need_scale,
                IEEE=ieee,
                BLOCK_R=block_r,
                ONE_R_TILE=one_r_tile,
            )

    d_down, d_up, d_ub = empty(), empty(), empty()
    if need_down or need_up or need_ub:
        splits = _splits(m, n, r, block_r, g.device)
        rows_per_split = triton.cdiv(triton.cdiv(m, splits), 128) * 128
        splits = triton.cdiv(m, rows_per_split)
        alloc = lambda *shape: torch.empty(shape, dtype=f32, device=g.device)  # noqa: E731
        d_down = alloc(splits, r, n) if need_down else empty()
        d_up = alloc(splits, n, r) if need_up else empty()
        d_ub = alloc(splits, n) if need_ub else empty()
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(n, meta["BLOCK_N"]),
            triton.cdiv(r, block_r),
            splits,
        )
        with _device_of(g):
            _series_backward_weights_kernel[grid](
                g, h, s_pre, ds if ds.numel() else s_pre, scale_arg,
                d_down if need_down else s_pre,
                d_up if need_up else s_pre,
                d_ub if need_ub else s_pre,
                m, n, r, rows_per_split,
                float(scaling), int(seed), threshold, inv_keep,
                ACT=activation_code(activation),
                HAS_SCALE_T=scale_t is not None,
                HAS_DROPOUT=has_dropout,
                NEED_DOWN=need_down,
                NEED_UP=need_up,
                NEED_UB=need_ub,
                IEEE=ieee,
                BLOCK_R=block_r,
            )
        # Fixed-order sum of the per-chunk partials (no atomics: deterministic).
        d_down = d_down.sum(0) if need_down else empty()
        d_up = d_up.sum(0) if need_up else empty()
        d_ub = d_ub.sum(0) if need_ub else empty()

    return (
        dh,
        d_down,
        d_up,
        ds.sum(0) if need_db else empty(),
        d_ub,
        dscale_rows.sum() if need_scale else empty(),
    )
