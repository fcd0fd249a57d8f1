"""Fused Triton kernels for the low-rank branch linear (LoRA and parallel adapters).

    y = x Wᵀ + b + s · φ(D(x) Aᵀ + a_b) Bᵀ + b_b       x [M, K], W [N, K], A [r, K], B [N, r]

The "split at S" plan (DESIGN §2.1). Reference in plain PyTorch, with its memory traffic:

    s_pre = (x * keep * inv_keep) @ A.T + a_b     # read MK (+ write MK masked copy); write Mr
    y = x @ W.T + b + s * phi(s_pre) @ B.T + b_b  # read MK + NK, write MN (+ an MN temporary)

The kernels here:
  forward   `_shrink_kernel`   S = D(x) Aᵀ + a_b: reads x once, dropout regenerated from the
                               Philox seed in registers (never stored, no masked copy of x).
            `_main_kernel`     y = x Wᵀ + b + b_b + s·φ(S) Bᵀ: one GEMM whose epilogue adds the
                               rank-r product (no [M, N] branch output, no separate add).
  backward  `_reduce_kernel`   one pass over g: gB = g B (rows, [M, r]) and dB = s gᵀ φ(S)
                               (columns, [N, r]); the same kernel, run over x with the mask
                               regenerated, gives dA = dSᵀ D(x).
            `_dx_kernel`       dx = g W + D'(dS A): one GEMM, the rank-r product and the
                               regenerated mask in its epilogue.
  dS = s · gB ⊙ φ'(S), d(scale) = Σ gB ⊙ φ(S) and the bias gradients are rank- or N-sized and
  are finished in PyTorch.
  lora_add (y = y0 + the branch, y0 a base output computed elsewhere): the same kernels, the
  main and dx kernels with HAS_BASE=False (y0 starts the accumulator; dx = D'(dS A) alone).
  DoRA (`dora.py`): the main kernel's COL_SCALE multiplies T (the accumulator before any bias)
  by c [N], SAVE_T stores T; the dx kernel's COL_SCALE scales g's columns by c as it loads them.

Reductions over M (dB, dA) are split into a fixed number of row ranges whose partial sums are
written to a small fp32 buffer and summed afterwards: no atomics, so backward is deterministic.
Offsets are int64 throughout: M·K and M·N pass 2**31 at large token counts (M = 2**18
against K = 14336, say), where int32 pointer arithmetic would wrap.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._numerics import (
    acc_dtype,
    activation_code,
    activation_grad,
    apply_activation,
    dropout_threshold,
    fp32_ieee,
    m_bucket,
)
from . import _limits
from ._common import INTERPRET as _INTERPRET
from ._common import dot, loop_bound, phi
from .dropout import keep_bits

# The rank is processed in chunks of at most this many columns: the [BLOCK_M, R] tiles of S
# and the [R, BLOCK_N] tiles of B share registers with the GEMM accumulator in the epilogue.
_MAX_R_CHUNK = 64
# The reductions over M keep a [BLOCK_C, R] accumulator per program: r up to 128 in one pass.
_MAX_R_REDUCE = 128
_FMA_ONLY = (64, 64, 32, 3, 8)  # a GEMM tile (BM, BN, BK, stages, warps) for IEEE fp32 alone


def _gemm_configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:
        # One small config (the interpreter runs programs in numpy); K loops, ragged tails.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    # sm_80 / sm_90 tiles, few on purpose: the autotuner compiles every config on first use
    # (seconds each), per dtype, for each GEMM. The first that fits both targets is the
    # AUTOTUNE=0 choice (_limits.choose); `_smem_model` prunes what cannot launch there.
    cfg = [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 3, 8),  # the epilogue's rank-r product adds register pressure
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),  # fp32: half the K depth per stage
        (64, 64, 32, 4, 4),  # fp32, and decode-sized M
        (64, 64, 32, 3, 4),  # fits an A100 in fp32 at any rank tile (the others may not)
        _FMA_ONLY,  # IEEE fp32 only: the dx kernel's 64x64 tiles with 4 warps spilled 3.4 KB
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=st,
            num_warps=w,
        )
        for bm, bn, bk, st, w in cfg
    ]


def _shrink_configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=st, num_warps=w)
        # the last fits both targets at any rank tile and weight dtype (fp32 at r = 256: A100)
        for bm, bk, st, w in [(64, 128, 4, 4), (32, 128, 4, 4), (32, 64, 3, 4)]
    ]


def _reduce_configs(interpret: bool = _INTERPRET) -> list[triton.Config]:
    if interpret:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_C": 32})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_stages=st, num_warps=w)
        # the last fits both targets at r = 128 per pass in fp32 (the others do not on an A100)
        for bm, bc, st, w in [(64, 128, 3, 4), (64, 64, 4, 4), (32, 64, 2, 4)]
    ]


def _smem_model(kernel: str, cfg: triton.Config, nargs: dict, cc: int) -> int:
    """Bytes of shared memory the compiled `kernel` allocates with `cfg`, from its launch
    arguments (`nargs`: pointer arguments and constexprs by name), on compute capability `cc`:
    an upper bound, not an exact count. Every software-pipelined loop is taken to buffer
    num_stages copies of the tiles it loads (in their load dtype), and the K loop's buffers and
    the rank-r epilogue's are counted as both live. The compiler keeps num_stages - 1 on sm_80
    and without wgmma, and sometimes reuses the K loop's space for the epilogue: the bound is
    up to ~2x on those (the price: a few configs that would fit are not timed there).
    `aot` fails if a compiled kernel ever needs more than this."""
    del cc  # one bound for both targets (see above)
    kw, st, br = cfg.kwargs, cfg.num_stages, nargs["BLOCK_R"]
    if kernel in ("_main_kernel", "_dx_kernel"):
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        if kernel == "_main_kernel":
            e = nargs["x_ptr"].element_size()
            main = (bm * bk + bk * bn) * e  # x [BM, BK], W [BK, BN]
            epi = bm * br * 4 + br * bn * nargs["b_ptr"].element_size()  # S fp32, B
        else:
            e = nargs["g_ptr"].element_size()
            main = (bm * bn + bn * bk) * e  # g [BM, BN], W [BN, BK]
            epi = bm * br * 4 + br * bk * nargs["a_ptr"].element_size()  # dS fp32, A
        if nargs.get("HAS_BASE", True):
            return st * (main + epi)
        # no base GEMM loop (lora_add): none of its buffers, but a layout conversion of the
        # fp32 accumulator tile (y0 into the MMA layout, or the result out of it) that
        # otherwise reuses their space
        return st * epi + bm * (bn if kernel == "_main_kernel" else bk) * 4
    if kernel == "_shrink_kernel":
        bm, bk = kw["BLOCK_M"], kw["BLOCK_K"]
        ex, ea = nargs["x_ptr"].element_size(), nargs["a_ptr"].element_size()
        return st * (bm * bk * ex + bk * br * ea) + (bm * bk * ex if nargs["DROPOUT"] else 0)
    if kernel == "_reduce_kernel":
        bm, bc = kw["BLOCK_M"], kw["BLOCK_C"]
        per = bm * bc * nargs["x_ptr"].element_size()
        fixed = bm * bc * nargs["x_ptr"].element_size() if nargs["DROPOUT"] else 0  # masked X
        if nargs["DO_COL"]:
            per += bm * br * 4  # Z fp32
        if nargs["DO_ROW"]:
            per += bm * br * 4  # the row partials read back
            fixed += bc * br * nargs["y_ptr"].element_size()  # Y, loaded once per column tile
        return st * per + fixed
    raise KeyError(kernel)


def _fma_registers(kernel: str, cfg: triton.Config, nargs: dict) -> float:
    """fp32 words per thread of the accumulators and product operands FMA (IEEE fp32) keeps in
    registers; tensor cores: 0, the tf32 reduce's X and X^T, inf for the FMA-only tile."""
    kw, br, bm = cfg.kwargs, nargs["BLOCK_R"], cfg.kwargs["BLOCK_M"]
    tile = (bm, kw.get("BLOCK_N"), kw.get("BLOCK_K"), cfg.num_stages, cfg.num_warps)
    if not nargs.get("IEEE"):  # and with tensor cores never the FMA-only GEMM tile
        if tile == _FMA_ONLY and kernel in ("_main_kernel", "_dx_kernel"):
            return float("inf")
        tf32 = kernel == "_reduce_kernel" and nargs["x_ptr"].element_size() == 4
        return 2 * bm * kw["BLOCK_C"] / (32 * cfg.num_warps) if tf32 else 0.0
    if kernel == "_main_kernel":  # acc [BM, BN]; x [BM, BK], W [BK, BN]
        words = bm * kw["BLOCK_N"] + kw["BLOCK_K"] * (bm + kw["BLOCK_N"])
    elif kernel == "_dx_kernel":  # acc [BM, BK] of the GEMM and of the rank-r product; g, W
        acc = (1 + bool(nargs.get("HAS_BASE", True))) * bm * kw["BLOCK_K"]
        words = acc + kw["BLOCK_N"] * (bm + kw["BLOCK_K"])
    elif kernel == "_shrink_kernel":  # acc [BM, BR]; x [BM, BK], A [BR, BK]
        words = bm * br + kw["BLOCK_K"] * (bm + br)
    else:  # x [BM, BC] (both passes: and X^T); rows: acc [BM, BR], Y [BC, BR]; cols: acc, phi(Z)
        bc, passes = kw["BLOCK_C"], nargs["DO_ROW"] + nargs["DO_COL"]
        words = bm * bc * (1 + (passes == 2)) + passes * (bm + bc) * br
    return words / (32 * cfg.num_warps)


def _prune(kernel: str):
    """early_config_prune for `kernel`: of the configs few registers allow (`_fma_registers`),
    those `_smem_model` fits in the device's shared memory, or the one AUTOTUNE=0 takes
    (`_limits.choose`). `target` ((cc, limit)) and `autotune` override device and environment."""

    def prune(configs, named_args, target=None, autotune=None, **kwargs):
        nargs = {**named_args, **kwargs}
        configs = _limits.fewest_registers(configs, lambda c: _fma_registers(kernel, c, nargs))
        if nargs.get("HAS_BASE") is False:  # no base GEMM loop: its depth changes nothing
            cols = "BLOCK_N" if kernel == "_main_kernel" else "BLOCK_K"  # the output tile's
            tiles = {}
            for c in configs:
                tiles.setdefault((c.kwargs["BLOCK_M"], c.kwargs[cols], c.num_warps), c)
            configs = list(tiles.values())
        if target is None:
            target = _limits.target_of(next(v for v in nargs.values() if hasattr(v, "device")))
        return _limits.choose(
            configs, lambda c, cc: _smem_model(kernel, c, nargs, cc), target, autotune
        )

    return prune


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Programs walk GROUP_M row tiles per column tile so the W tiles they share stay in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n


# ----------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_shrink_configs(),
    key=["M_BUCKET", "K", "R"],
    prune_configs_by={"early_config_prune": _prune("_shrink_kernel")},
)
@triton.jit
def _shrink_kernel(
    x_ptr, stride_xm, stride_xk,
    a_ptr, stride_ar, stride_ak,
    ab_ptr,
    s_ptr, stride_sm,
    M, K, R, M_BUCKET,
    seed, threshold, inv_keep,
    HAS_AB: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """S[m, j] = inv_keep · Σ_k keep(m, k) x[m, k] A[j, k] + a_b[j], fp32, one [BLOCK_M, BLOCK_R]
    tile per program. The keep bits are regenerated from (seed, m·K + k)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_in = offs_m < M
    r_in = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        ks = k0 + offs_k
        k_in = ks < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
            mask=m_in[:, None] & k_in[None, :], other=0.0,
        )
        if DROPOUT:
            keep = keep_bits(seed, offs_m[:, None] * K + ks[None, :], threshold)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + ks[:, None] * stride_ak,
            mask=r_in[None, :] & k_in[:, None], other=0.0,
        )
        acc = dot(x, a.to(x.dtype), acc, IEEE)
    if DROPOUT:
        acc = acc * inv_keep  # scale the rank-sized result, not x
    if HAS_AB:
        acc += tl.load(ab_ptr + offs_r, mask=r_in, other=0.0).to(tl.float32)[None, :]
    tl.store(
        s_ptr + offs_m[:, None] * stride_sm + offs_r[None, :], acc,
        mask=m_in[:, None] & r_in[None, :],
    )


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "R", "HAS_BASE"],
    prune_configs_by={"early_config_prune": _prune("_main_kernel")},
)
@triton.jit
def _main_kernel(
    x_ptr, stride_xm, stride_xk,
    w_ptr, stride_wn, stride_wk,
    bias_ptr, bb_ptr,
    s_ptr, stride_sm,
    b_ptr, stride_bn, stride_br,
    scale_ptr, scaling,
    y0_ptr, stride_y0m, stride_y0n,
    y_ptr, stride_ym, stride_yn,
    c_ptr, t_ptr, stride_tm, stride_tn,
    M, N, K, R, M_BUCKET,
    ACT: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BB: tl.constexpr,
    HAS_SCALE_T: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    COL_SCALE: tl.constexpr, SAVE_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y tile = x Wᵀ (K loop) + b + b_b + s·φ(S) Bᵀ (epilogue, r in BLOCK_R chunks).
    HAS_BASE=False (lora_add): y0 [M, N], a base output computed elsewhere, starts the
    accumulator in place of x Wᵀ; y0 is read once and not written. DoRA: SAVE_T stores the
    accumulator T before any bias (t [M, N]); COL_SCALE multiplies it by c [N] (fp32) there."""
    pid = tl.program_id(0)
    pid_m, pid_n = _grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_in = offs_m < M
    n_in = offs_n < N
    if HAS_BASE:
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, loop_bound(K), BLOCK_K):
            k_in = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_in[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_in[None, :] & k_in[:, None], other=0.0)
            acc = dot(x, w, acc, IEEE)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
    else:
        acc = tl.load(
            y0_ptr + offs_m[:, None] * stride_y0m + offs_n[None, :] * stride_y0n,
            mask=m_in[:, None] & n_in[None, :], other=0.0,
        ).to(tl.float32)
    dt = x_ptr.dtype.element_ty
    if HAS_SCALE_T:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scaling
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    for r0 in range(0, loop_bound(R), BLOCK_R):
        rs = r0 + offs_r
        r_in = rs < R
        sp = tl.load(
            s_ptr + offs_m[:, None] * stride_sm + rs[None, :],
            mask=m_in[:, None] & r_in[None, :], other=0.0,
        )
        h = (phi(sp, ACT) * s).to(dt)
        bt = tl.load(
            b_ptr + offs_n[None, :] * stride_bn + rs[:, None] * stride_br,
            mask=n_in[None, :] & r_in[:, None], other=0.0,
        )
        acc = dot(h, bt.to(dt), acc, IEEE)
    if SAVE_T:
        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn, acc.to(dt),
                 mask=m_in[:, None] & n_in[None, :])
    if COL_SCALE:
        acc *= tl.load(c_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    if HAS_BB:
        acc += tl.load(bb_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(dt),
        mask=m_in[:, None] & n_in[None, :],
    )


# ----------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------


@triton.autotune(
    configs=_reduce_configs(),
    key=["M_BUCKET", "C", "R", "DO_ROW", "DO_COL"],
    prune_configs_by={"early_config_prune": _prune("_reduce_kernel")},
)
@triton.jit
def _reduce_kernel(
    x_ptr, stride_xm, stride_xc,
    y_ptr, stride_yc, stride_yr,
    z_ptr, stride_zm,
    row_ptr, col_ptr,
    M, C, R, M_BUCKET,
    seed, threshold,
    DO_ROW: tl.constexpr, DO_COL: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One pass over a wide [M, C] operand X (optionally dropout-masked) producing
        rows[pc, m, j] = Σ_{c in range pc} X[m, c] Y[c, j]     (DO_ROW; Y [C, R])
        cols[pm, c, j] = Σ_{m in range pm} X[m, c] φ(Z[m, j])  (DO_COL; Z [M, R] fp32)
    Grid (split_m, split_c, r chunks); partial sums go to contiguous fp32 buffers
    rows [split_c, M, R] and cols [split_m, C, R], summed by the caller."""
    pm = tl.program_id(0)
    pc = tl.program_id(1)
    pr = tl.program_id(2).to(tl.int64)
    # Each program owns a range of row tiles and a range of column tiles.
    m_tiles = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(0))
    c_tiles = tl.cdiv(tl.cdiv(C, BLOCK_C), tl.num_programs(1))
    m_start = pm * m_tiles * BLOCK_M
    m_end = tl.minimum(m_start + m_tiles * BLOCK_M, M)
    c_start = pc * c_tiles * BLOCK_C
    c_end = tl.minimum(c_start + c_tiles * BLOCK_C, C)
    dt = x_ptr.dtype.element_ty
    offs_r = pr * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_in = offs_r < R
    ar_m = tl.arange(0, BLOCK_M).to(tl.int64)
    ar_c = tl.arange(0, BLOCK_C).to(tl.int64)
    for c0 in range(loop_bound(c_start), loop_bound(c_end), BLOCK_C):
        offs_c = c0 + ar_c
        c_in = offs_c < c_end
        if DO_ROW:
            y = tl.load(
                y_ptr + offs_c[:, None] * stride_yc + offs_r[None, :] * stride_yr,
                mask=c_in[:, None] & r_in[None, :], other=0.0,
            ).to(dt)
        col_acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for m0 in range(loop_bound(m_start), loop_bound(m_end), BLOCK_M):
            offs_m = m0 + ar_m
            m_in = offs_m < m_end
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                mask=m_in[:, None] & c_in[None, :], other=0.0,
            )
            if DROPOUT:
                keep = keep_bits(seed, offs_m[:, None] * C + offs_c[None, :], threshold)
                x = tl.where(keep, x, tl.zeros_like(x))
            if DO_ROW:
                # The first column tile of this range writes, the others accumulate: rerunning
                # the kernel (autotuning) gives the same result.
                row_ptrs = row_ptr + (pc * M + offs_m[:, None]) * R + offs_r[None, :]
                row_mask = m_in[:, None] & r_in[None, :]
                prev = tl.load(row_ptrs, mask=row_mask & (c0 != c_start), other=0.0)
                part = dot(x, y, prev, IEEE)
                tl.store(row_ptrs, part, mask=row_mask)
            if DO_COL:
                z = tl.load(
                    z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :],
                    mask=m_in[:, None] & r_in[None, :], other=0.0,
                )
                h = phi(z, ACT).to(dt)
                col_acc = dot(tl.trans(x), h, col_acc, IEEE)
        if DO_COL:
            tl.store(
                col_ptr + (pm * C + offs_c[:, None]) * R + offs_r[None, :], col_acc,
                mask=c_in[:, None] & r_in[None, :],
            )


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "R", "HAS_BASE"],
    prune_configs_by={"early_config_prune": _prune("_dx_kernel")},
)
@triton.jit
def _dx_kernel(
    g_ptr, stride_gm, stride_gn,
    w_ptr, stride_wn, stride_wk,
    ds_ptr, stride_dsm,
    a_ptr, stride_ar, stride_ak,
    dx_ptr, stride_dxm, stride_dxk,
    c_ptr, M, N, K, R, M_BUCKET,
    seed, threshold, inv_keep,
    HAS_BASE: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
    COL_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx tile = g W (N loop) + D'(dS A) (epilogue: r in chunks, keep bits regenerated).
    HAS_BASE=False (lora_add): D'(dS A) alone, g and W are not read (the base layer's own
    backward gives its part of dx). COL_SCALE (DoRA): g's columns times c [N] as loaded."""
    pid = tl.program_id(0)
    # The output is [M, K]: "columns" here are K, the reduction runs over N.
    pid_m, pid_k = _grouped_pid(pid, M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    m_in = offs_m < M
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    dt = g_ptr.dtype.element_ty
    if HAS_BASE:
        g_ptrs = g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        for n0 in range(0, loop_bound(N), BLOCK_N):
            n_in = offs_n < N - n0
            g = tl.load(g_ptrs, mask=m_in[:, None] & n_in[None, :], other=0.0)
            if COL_SCALE:
                c = tl.load(c_ptr + n0 + offs_n, mask=n_in, other=0.0).to(tl.float32)
                g = (g.to(tl.float32) * c[None, :]).to(dt)
            w = tl.load(w_ptrs, mask=n_in[:, None] & k_in[None, :], other=0.0)
            acc = dot(g, w, acc, IEEE)
            g_ptrs += BLOCK_N * stride_gn
            w_ptrs += BLOCK_N * stride_wn
    lr = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    for r0 in range(0, loop_bound(R), BLOCK_R):
        rs = r0 + offs_r
        r_in = rs < R
        ds = tl.load(
            ds_ptr + offs_m[:, None] * stride_dsm + rs[None, :],
            mask=m_in[:, None] & r_in[None, :], other=0.0,
        ).to(dt)
        a = tl.load(
            a_ptr + rs[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=r_in[:, None] & k_in[None, :], other=0.0,
        ).to(dt)
        lr = dot(ds, a, lr, IEEE)
    if DROPOUT:
        keep = keep_bits(seed, offs_m[:, None] * K + offs_k[None, :], threshold)
        lr = tl.where(keep, lr * inv_keep, 0.0)
    acc += lr
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(dt),
        mask=m_in[:, None] & k_in[None, :],
    )


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _r_block(r: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(int(r))), cap)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(m: int, c: int, device: torch.device, with_rows: bool) -> tuple[int, int]:
    """Row and column split counts for `_reduce_kernel`: about two programs per SM (a
    memory-bound pass wants more than one CTA in flight per SM), balanced so the partial
    buffers (split_c·M·r + split_m·C·r floats; minimal at split_c ≈ sqrt(target·C / M)) stay
    small next to X itself."""
    target = 2 * _num_sms(device)
    max_m = max(1, triton.cdiv(m, 32))
    max_c = max(1, triton.cdiv(c, 32))
    if not with_rows:  # column partials only: split the columns as far as they go
        split_c = min(max_c, target)
        return max(1, min(max_m, triton.cdiv(target, split_c))), split_c
    split_c = int(round((target * c / max(m, 1)) ** 0.5))
    split_c = max(1, min(max_c, split_c))
    split_m = max(1, min(max_m, triton.cdiv(target, split_c)))
    return split_m, split_c


def _reduce(x, y, z, act, p, seed, do_row, do_col, r):
    """Launch `_reduce_kernel`; returns (rows [M, r] or None, cols [C, r] or None), fp32."""
    m, c = x.shape
    t, _ = dropout_threshold(p)
    split_m, split_c = _splits(m, c, x.device, do_row)
    block_r = _r_block(r, _MAX_R_REDUCE)
    rows = torch.zeros((split_c, m, r), dtype=torch.float32, device=x.device) if do_row else None
    cols = torch.empty((split_m, c, r), dtype=torch.float32, device=x.device) if do_col else None
    dummy = x  # any valid pointer; the kernel never touches an operand it was not given
    grid = (split_m, split_c, triton.cdiv(r, block_r))
    _reduce_kernel[grid](
        x, x.stride(0), x.stride(1),
        y if y is not None else dummy,
        y.stride(0) if y is not None else 0, y.stride(1) if y is not None else 0,
        z if z is not None else dummy, z.stride(0) if z is not None else 0,
        rows if rows is not None else dummy, cols if cols is not None else dummy,
        m, c, r, m_bucket(m), int(seed), t,
        DO_ROW=do_row, DO_COL=do_col, ACT=activation_code(act), DROPOUT=p > 0.0,
        IEEE=fp32_ieee(x.dtype), BLOCK_R=block_r,
    )
    rows = None if rows is None else (rows[0] if split_c == 1 else rows.sum(0))
    cols = None if cols is None else (cols[0] if split_m == 1 else cols.sum(0))
    return rows, cols


def _check(x: Tensor, base: Tensor, a: Tensor, b: Tensor, name: str = "weight") -> None:
    if x.dim() != 2 or base.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"the LoRA launchers expect 2-D x, {name}, a, b; got shapes {tuple(x.shape)}, "
            f"{tuple(base.shape)}, {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    if base.dtype != x.dtype:
        raise TypeError(f"{name} dtype {base.dtype} does not match x dtype {x.dtype}")


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    a_bias: Tensor | None,
    b_bias: Tensor | None,
    scale_t: Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = x Wᵀ + b + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b.

    x [M, K] (any strides), weight [N, K] (any strides, x.dtype), bias [N] | None, a [r, K],
    b [N, r], a_bias [r] | None, b_bias [N] | None, scale_t 0-dim | None (else `scaling`).
    Returns (y [M, N] x.dtype, s_pre [M, r] fp32 (fp64 for fp64 x), an empty bool mask: the
    keep-mask is regenerated from `seed` in backward).
    """
    _check(x, weight, a, b)
    return _forward(x, weight, bias, None, a, b, a_bias, b_bias, scale_t, scaling, p, seed,
                    activation)[:3]


def lora_add_forward(
    x: Tensor,
    y0: Tensor,
    a: Tensor,
    b: Tensor,
    a_bias: Tensor | None,
    b_bias: Tensor | None,
    scale_t: Tensor | None,
    scaling: float,
    p: float,
    seed: int,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = y0 + s·φ(D(x) Aᵀ + a_b) Bᵀ + b_b: the branch added into a base output y0 [M, N]
    (x.dtype, any strides) computed elsewhere. The shrink kernel, then `_main_kernel` without
    its base GEMM: y0 starts the accumulator, read once; y is a new tensor, y0 is not written
    (memory traffic: read MK + MN, write MN). Other arguments and results as `lora_forward`.
    """
    _check(x, y0, a, b, "y0")
    return _forward(x, None, None, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed,
                    activation)[:3]


def _forward(x, weight, bias, y0, a, b, a_bias, b_bias, scale_t, scaling, p, seed, activation,
             col=None, save_t=False):
    """lora_forward (weight given) or lora_add_forward (y0 given instead); DoRA (`dora.py`):
    col c [N] fp32 scales T's columns before the bias, save_t stores T. -> (y, s_pre, mask, t)"""
    m, k = x.shape
    n, r = b.shape
    t, inv_keep = dropout_threshold(p)
    dropout = p > 0.0 and t > 0
    s_pre = torch.empty((m, r), dtype=torch.float32, device=x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    empty_mask = x.new_empty(0, dtype=torch.bool)
    t_out = torch.empty((m, n), dtype=x.dtype, device=x.device) if save_t else x.new_empty(0)
    if m == 0:
        return y, s_pre, empty_mask, t_out
    ieee = fp32_ieee(x.dtype)
    bucket = m_bucket(m)
    dummy = s_pre  # any valid pointer; the kernels never touch an operand they were not given
    block_r = _r_block(r, _MAX_R_REDUCE)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))  # noqa: E731
    _shrink_kernel[grid](
        x, x.stride(0), x.stride(1),
        a, a.stride(0), a.stride(1),
        a_bias if a_bias is not None else dummy,
        s_pre, s_pre.stride(0),
        m, k, r, bucket, int(seed), t, inv_keep,
        HAS_AB=a_bias is not None, DROPOUT=dropout, IEEE=ieee, BLOCK_R=block_r,
    )
    if n == 0:
        return y, s_pre, empty_mask, t_out
    grid = lambda meta: (  # noqa: E731
        triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),
    )
    has_base = weight is not None
    w, base = (weight, dummy) if has_base else (dummy, y0)
    w_strides = (weight.stride(0), weight.stride(1)) if has_base else (0, 0)
    y0_strides = (0, 0) if has_base else (y0.stride(0), y0.stride(1))
    _main_kernel[grid](
        x, x.stride(0), x.stride(1),
        w, *w_strides,
        bias if bias is not None else dummy,
        b_bias if b_bias is not None else dummy,
        s_pre, s_pre.stride(0),
        b, b.stride(0), b.stride(1),
        scale_t if scale_t is not None else dummy, float(scaling),
        base, *y0_strides,
        y, y.stride(0), y.stride(1),
        col if col is not None else dummy, t_out, *(t_out.stride() if save_t else (0, 0)),
        m, n, k if has_base else 0, r, bucket,
        ACT=activation_code(activation), HAS_BASE=has_base, HAS_BIAS=bias is not None,
        HAS_BB=b_bias is not None, HAS_SCALE_T=scale_t is not None, IEEE=ieee,
        BLOCK_R=_r_block(r, _MAX_R_CHUNK), COL_SCALE=col is not None, SAVE_T=save_t,
    )
    return y, s_pre, empty_mask, t_out


def lora_backward(
    g: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale_t: Tensor | None,
    scaling: float, p: float, seed: int, activation: str, s_pre: Tensor, mask: Tensor, needs,
) -> tuple[Tensor, ...]:
    """Gradients of `lora_forward` for g = dL/dy [M, N].

    needs = (dx, dbias, da, db, da_bias, db_bias, dscale). Returns those 7 tensors: dx [M, K]
    in g.dtype, dbias [N], da [r, K], db [N, r], da_bias [r], db_bias [N], dscale [] in fp32
    (fp64 for fp64 g); an empty [0] tensor where not needed. `mask` is unused (empty): the
    keep-mask is regenerated from `seed`.
    """
    return _backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, needs)


def lora_add_backward(
    g: Tensor, x: Tensor, a: Tensor, b: Tensor, scale_t: Tensor | None, scaling: float,
    p: float, seed: int, activation: str, s_pre: Tensor, mask: Tensor, needs,
) -> tuple[Tensor, ...]:
    """Gradients of `lora_add_forward` for g = dL/dy [M, N], but dy0 (= g, handed on by the
    op wrapper). needs = (dx, da, db, da_bias, db_bias, dscale); returns those 6 tensors as
    `lora_backward` does. dx is the branch's term D'(dS A) only: `_dx_kernel` without its base
    GEMM (the base layer's own backward adds its part through y0)."""
    need_dx, *rest = needs
    out = _backward(g, x, None, a, b, scale_t, scaling, p, seed, activation, s_pre,
                    (need_dx, False, *rest))
    return (out[0], *out[2:])


def _backward(g, x, weight, a, b, scale_t, scaling, p, seed, activation, s_pre, needs):
    """lora_backward (weight given) or lora_add_backward (weight None: no base term in dx)."""
    need_dx, need_bias, need_a, need_b, need_ab, need_bb, need_scale = (bool(v) for v in needs)
    s_pre = s_pre.contiguous()
    m, k = x.shape
    n, r = b.shape
    acc = acc_dtype(g.dtype)
    t, inv_keep = dropout_threshold(p)
    dropout = p > 0.0 and t > 0
    p_eff = p if dropout else 0.0

    def empty():
        return g.new_empty(0, dtype=acc)

    s = scaling if scale_t is None else scale_t.to(acc)
    need_gb = need_dx or need_a or need_ab or need_scale
    gb = d_b = None
    if (need_gb or need_b) and m > 0 and n > 0:
        # One pass over g: gB = g B and gᵀ φ(S).
        gb, d_b = _reduce(g, b, s_pre, activation, 0.0, 0, need_gb, need_b, r)
    elif need_gb or need_b:
        gb = torch.zeros((m, r), dtype=acc, device=g.device)
        d_b = torch.zeros((n, r), dtype=acc, device=g.device)
    if need_b:
        d_b = d_b.mul_(s) if scale_t is None else d_b * s
    ds = None
    d_scale = None
    if need_gb:
        if need_scale:
            d_scale = (gb * apply_activation(s_pre, activation)).sum()
        ds = gb.mul_(s) if scale_t is None else gb * s
        grad = activation_grad(s_pre, activation)
        if grad is not None:
            ds.mul_(grad)
    dx = _dx(g, weight, ds, a, k, seed, p) if need_dx else g.new_empty(0)
    d_a = empty()
    if need_a:
        if m > 0 and k > 0:
            # dAᵀ = D(x)ᵀ dS: the column reduction over x, the mask regenerated in registers.
            _, cols = _reduce(x, None, ds, "identity", p_eff, seed, False, True, r)
            d_a = cols.t().contiguous()
            if dropout:
                d_a.mul_(inv_keep)
        else:
            d_a = torch.zeros((r, k), dtype=acc, device=g.device)
    g_sum = g.to(acc).sum(0) if (need_bias or need_bb) else None
    return (
        dx,
        g_sum.clone() if need_bias else empty(),
        d_a,
        d_b if need_b else empty(),
        ds.sum(0) if need_ab else empty(),
        g_sum if need_bb else empty(),
        d_scale if need_scale else empty(),
    )


def _dx(g, weight, ds, a, k, seed, p, col=None):
    """dx [M, K] = (c ⊙ g) W + D'(dS A) (`_dx_kernel`; no base term when weight is None, g
    unscaled when col is None)."""
    (m, n), r = g.shape, ds.shape[1]
    t, inv_keep = dropout_threshold(p)
    dx = torch.empty((m, k), dtype=g.dtype, device=g.device)
    if m > 0 and k > 0:
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),
        )
        has_base = weight is not None
        _dx_kernel[grid](
            g, g.stride(0), g.stride(1),
            weight if has_base else ds,
            weight.stride(0) if has_base else 0, weight.stride(1) if has_base else 0,
            ds, ds.stride(0),
            a, a.stride(0), a.stride(1),
            dx, dx.stride(0), dx.stride(1),
            col if col is not None else ds,
            m, n if has_base else 0, k, r, m_bucket(m), int(seed), t, inv_keep,
            HAS_BASE=has_base, DROPOUT=p > 0.0 and t > 0, IEEE=fp32_ieee(g.dtype),
            BLOCK_R=_r_block(r, _MAX_R_CHUNK), COL_SCALE=col is not None,
        )
    return dx
