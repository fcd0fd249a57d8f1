// The row-block kernels: the fused series forward (series_fwd_block) and the one pass over g
// of the backward (grad_rows_block), each also on the tensor cores for 16-bit activations, and
// the fixed-order sum of their per-block partials.
#pragma once

#include "common.cuh"
#include "expand.cuh"
#include "tc.cuh"

namespace llm_adapters {

// ----------------------------------------------------------------------------------------------
// Row-block kernels: one block per kRowBM rows, walking the whole width N
// ----------------------------------------------------------------------------------------------
// row_shrink_block computes, for the block's rows,
//     S[m, j] = out_scale · Σ_n D(X)[m, n] W[n, j] + bias[j]        (all j, rank tiles of 64)
// and, when `part` is set, in the same pass over X (each tile of X is staged once per rank tile)
//     part[block, n, j] = Σ_{m in block} X[m, n] φ(H[m, j])        (the block's rows only)
// whose fixed-order sum over blocks (sum_partials) is the skinny reduction gᵀφ(S) of dB / dUp.
// The series forward / backward and the LoRA backward build on it:
//   series_fwd:  S = shrink(h) -> s_pre;  z = h + s·φ(S) Upᵀ + u_b (expand tiles over N, h
//                re-read: from L2 on a GPU, the block's slice was just read)
//   grad_rows:   G = g·Up (+ dUp partials from the same tiles of g);  per-row Σ_j G φ(S);
//                dS = s·G ⊙ φ'(S) in place;  [series] dh = g + D'(dS Dn) (expand tiles over N)
// S / G / dS are written to global memory and read back by the same block after a barrier
// (__syncthreads orders global memory within a block), so the rank is not bounded by shared
// memory. One pass over X covers RT rank tiles of 64 in registers (RT = 1, or kRowWideRT = 4
// when r > 64 and no partials are asked for: up to 256 ranks per read of X); larger ranks run
// several passes, re-reading the block's rows of X (from L2 when they still are there).

constexpr int kRowBM = kExpandBM;  // 64 rows: one expand row tile
constexpr int kRowBR = 64;         // rank columns per tile
constexpr int kRowBK = 32;         // columns of X staged per step
constexpr int kRowXLD = kRowBK + 1;
constexpr int kRowWLD = kRowBR + 1;
constexpr int kRowPLD = kRowBR + 1;
constexpr int kRowWideRT = 4;
constexpr int kRowSmemFloats = kRowBM * kRowXLD + kRowBK * kRowWLD + kRowBM * kRowPLD;
constexpr int kRowWideSmemFloats = kRowBM * kRowXLD + kRowBK * (kRowWideRT * kRowBR + 1);
// the thread layouts below: S tile 16 x 16 threads of 4 x 4; partial tile 64 x 4 threads of 1 x 8
static_assert(kThreads == 256 && kRowBM == 64 && kRowBR == 64 && kRowBK == 32,
              "row_shrink_block's thread layouts assume these tile sizes");
template <int RT>
constexpr int row_fused_smem_floats() {
  return (RT == 1 ? kRowSmemFloats : kRowWideSmemFloats) > kExpandSmemFloats
             ? (RT == 1 ? kRowSmemFloats : kRowWideSmemFloats)
             : kExpandSmemFloats;
}

template <typename T>
struct RowShrinkArgs {
  const T* x;  // [M, N] contiguous
  int64_t M, N;
  const float* w;  // W[n, j] = w[n * w_sn + j * w_sr], [N, R]
  int64_t w_sn, w_sr, R;
  float* s;              // [M, R] contiguous
  const float* s_bias;   // [R] or null
  float out_scale;
  DropoutParams drop;    // keep-mask of X (linear index m * N + n)
  const float* h;        // [M, R] contiguous: φ(h) weighs the partials; null: no partials
  int act;
  float* part;           // [blocks, N, R]
};

template <int RT, typename T, typename Sync>
LA_HOST_DEVICE void row_shrink_block(const RowShrinkArgs<T>& a, int64_t mb, int tid, float* smem,
                                     Sync& sync) {
  static_assert(RT == 1 || RT == kRowWideRT, "rank tiles per pass: 1 or kRowWideRT");
  constexpr int BR = RT * kRowBR;  // rank columns per pass over X
  constexpr int WLD = BR + 1;
  float* xs = smem;                       // [kRowBM][kRowXLD]
  float* ws = xs + kRowBM * kRowXLD;      // [kRowBK][WLD]
  float* ps = ws + kRowBK * WLD;          // [kRowBM][kRowPLD]  φ(H) of the block's rows (RT 1)
  const int64_t m0 = mb * kRowBM;
  // S tile: thread owns rows ty + 16 i, rank columns tx + 16 c (c < 4 RT)
  const int tx = tid % 16;
  const int ty = tid / 16;
  // partial tile [kRowBK, kRowBR]: thread owns rank column pj and columns pn + 4 c of X, so a
  // warp's stores of one partial row are 32 consecutive floats
  const int pj = tid % kRowBR;
  const int pn = tid / kRowBR;
  const bool partials = RT == 1 && a.part != nullptr;  // the host asks for them with RT 1 only

  for (int64_t j0 = 0; j0 < a.R; j0 += BR) {
    if (partials) {
      for (int e = tid; e < kRowBM * kRowBR; e += kThreads) {
        const int mm = e / kRowBR;
        const int jj = e % kRowBR;
        const int64_t m = m0 + mm;
        const int64_t j = j0 + jj;
        ps[mm * kRowPLD + jj] = (m < a.M && j < a.R) ? activate(a.h[m * a.R + j], a.act) : 0.f;
      }
    }
    float acc[4][4 * RT];
    LA_UNROLL
    for (int i = 0; i < 4; ++i) {
      LA_UNROLL
      for (int c = 0; c < 4 * RT; ++c) acc[i][c] = 0.f;
    }
    for (int64_t n0 = 0; n0 < a.N; n0 += kRowBK) {
      for (int e = tid; e < kRowBM * kRowBK; e += kThreads) {
        const int mm = e / kRowBK;
        const int nn = e % kRowBK;
        const int64_t m = m0 + mm;
        const int64_t n = n0 + nn;
        float val = 0.f;
        if (m < a.M && n < a.N) {
          val = static_cast<float>(a.x[m * a.N + n]);
          if (a.drop.enabled && !keep_element(a.drop, static_cast<uint64_t>(m * a.N + n))) {
            val = 0.f;
          }
        }
        xs[mm * kRowXLD + nn] = val;
      }
      for (int e = tid; e < kRowBK * BR; e += kThreads) {
        const int nn = e / BR;
        const int jj = e % BR;
        const int64_t n = n0 + nn;
        const int64_t j = j0 + jj;
        ws[nn * WLD + jj] = (n < a.N && j < a.R) ? a.w[n * a.w_sn + j * a.w_sr] : 0.f;
      }
      sync();
      LA_UNROLL
      for (int kk = 0; kk < kRowBK; ++kk) {
        float wv[4 * RT];
        LA_UNROLL
        for (int c = 0; c < 4 * RT; ++c) wv[c] = ws[kk * WLD + tx + 16 * c];
        LA_UNROLL
        for (int i = 0; i < 4; ++i) {
          const float xv = xs[(ty + 16 * i) * kRowXLD + kk];
          LA_UNROLL
          for (int c = 0; c < 4 * RT; ++c) acc[i][c] += xv * wv[c];
        }
      }
      if (partials) {
        float pacc[8];
        LA_UNROLL
        for (int c = 0; c < 8; ++c) pacc[c] = 0.f;
        for (int mm = 0; mm < kRowBM; ++mm) {
          const float pv = ps[mm * kRowPLD + pj];
          LA_UNROLL
          for (int c = 0; c < 8; ++c) pacc[c] += xs[mm * kRowXLD + pn + 4 * c] * pv;
        }
        const int64_t j = j0 + pj;
        if (j < a.R) {
          LA_UNROLL
          for (int c = 0; c < 8; ++c) {
            const int64_t n = n0 + pn + 4 * c;
            if (n < a.N) a.part[(mb * a.N + n) * a.R + j] = pacc[c];
          }
        }
      }
      sync();
    }
    LA_UNROLL
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + ty + 16 * i;
      if (m >= a.M) continue;
      LA_UNROLL
      for (int c = 0; c < 4 * RT; ++c) {
        const int64_t j = j0 + tx + 16 * c;
        if (j < a.R) {
          a.s[m * a.R + j] = acc[i][c] * a.out_scale + (a.s_bias != nullptr ? a.s_bias[j] : 0.f);
        }
      }
    }
  }
}

// Fused series forward: s_pre = shrink of h (with d_b); z = expand of s_pre over h.
template <typename T>
struct SeriesFwdArgs {
  RowShrinkArgs<T> shrink;  // x = h, w = Dn as [N, r], s = s_pre, no partials
  ExpandArgs<T> expand;     // out = z, in = h, h = s_pre, w = Up, bias = u_b
  bool vec_ok = false;      // series_fwd_tc_block: h 16-byte aligned, N a multiple of 8
};

template <int RT, typename T, typename Sync>
LA_HOST_DEVICE void series_fwd_block(const SeriesFwdArgs<T>& a, int64_t mb, int tid, float* smem,
                                     Sync& sync) {
  row_shrink_block<RT>(a.shrink, mb, tid, smem, sync);
  sync();  // s_pre of the block's rows is in global memory: visible to the whole block now
  for (int64_t nb = 0; nb * kExpandBN < a.expand.N; ++nb) {
    expand_block(a.expand, BlockIdx{mb, nb, 0}, tid, smem, sync);
  }
}

// One pass over g: G = g·W (+ partials of gᵀφ(S)); row_terms[m] = Σ_j G[m, j] φ(S[m, j]);
// dS = s·G ⊙ φ'(S) written over G; with `dh`: dh = g + D'(dS Dn) (expand tiles over N).
template <typename T>
struct GradRowsArgs {
  RowShrinkArgs<T> shrink;  // x = g, w = B / Up as [N, r], s = the dS buffer, h = s_pre
  const float* s_pre;       // [M, r]
  float* row_terms;         // [M] or null
  const float* scale_ptr;   // one float or null
  float scaling;
  bool dh;
  ExpandArgs<T> expand;     // out = dh, in = g, h = dS, w = Dn as [N, r], scaling = 1 / keep
  bool vec_ok = false;      // grad_rows_tc_block: g 16-byte aligned, N a multiple of 8
};

// The part of grad_rows after G: row terms, dS in place, [dh]. G of the block's rows is in
// the dS buffer (global memory); the caller has synchronised the block.
// TC: the dh expand on the tensor cores (expand_tc_block; 16-bit T only).
template <bool TC, typename T, typename Sync>
LA_HOST_DEVICE void grad_rows_tail(const GradRowsArgs<T>& a, int64_t mb, int tid, float* smem,
                                   Sync& sync) {
  const int64_t m0 = mb * kRowBM;
  const int64_t M = a.shrink.M, R = a.shrink.R;
  const int act = a.shrink.act;
  float* ds = a.shrink.s;
  if (a.row_terms != nullptr) {
    for (int mm = tid; mm < kRowBM; mm += kThreads) {
      const int64_t m = m0 + mm;
      if (m >= M) continue;
      float sum = 0.f;
      for (int64_t j = 0; j < R; ++j) sum += ds[m * R + j] * activate(a.s_pre[m * R + j], act);
      a.row_terms[m] = sum;
    }
    sync();
  }
  const float scale = a.scale_ptr == nullptr ? a.scaling : a.scaling * a.scale_ptr[0];
  for (int64_t e = tid; e < kRowBM * R; e += kThreads) {
    const int64_t m = m0 + e / R;
    if (m >= M) continue;
    const int64_t idx = m * R + e % R;
    ds[idx] = scale * ds[idx] * activate_grad(a.s_pre[idx], act);
  }
  if (!a.dh) return;
  sync();
  for (int64_t nb = 0; nb * kExpandBN < a.expand.N; ++nb) {
    if constexpr (TC) {
      expand_tc_block(a.expand, BlockIdx{mb, nb, 0}, tid, smem, sync);
    } else {
      expand_block(a.expand, BlockIdx{mb, nb, 0}, tid, smem, sync);
    }
  }
}

template <int RT, typename T, typename Sync>
LA_HOST_DEVICE void grad_rows_block(const GradRowsArgs<T>& a, int64_t mb, int tid, float* smem,
                                    Sync& sync) {
  row_shrink_block<RT>(a.shrink, mb, tid, smem, sync);
  sync();
  grad_rows_tail<false>(a, mb, tid, smem, sync);
}

// ----------------------------------------------------------------------------------------------
// grad_rows on the tensor cores (float16 / bfloat16 g; sm_80+)
// ----------------------------------------------------------------------------------------------
// The GEMM-shaped parts of the one pass over g with tile MMAs; the rest (row terms, dS, dh with
// its dropout) is grad_rows_tail on the CUDA cores, as in grad_rows_block. Same block (64 rows
// of g), same outputs, same per-block partials: only how G and the partials are summed differs.
//   G = g·W           A = the staged g tile [64 m][64 n] row-major, B = W hi / lo [n][j]
//   part = gᵀ φ(S)    A = the same g tile read column-major ([n][m]), B = φ(S) hi / lo [m][j]
// Operands in float32 (W, φ(S)) are split into hi + lo parts in g's type, both through the MMA
// into one float32 accumulator, with a power-of-two pre-scale of each for float16, exactly as
// shrink_tc_block / reduce_rows_tc_block do (their comments give the error bound).
// Warps: G's 4 row tiles x 4 k-steps of a 64-column step are split as row tile warp % 4, k-steps
// 2 (warp / 4) and 2 (warp / 4) + 1; the two halves are added in a fixed order at the end. The
// partials' 4 column tiles x NT rank tiles: column tile warp % 4, rank tiles of parity warp / 4
// (each warp all 64 rows: a partial is complete within the step and written out at once).
// g of the block is read once per rank tile of 64 (r > 64 re-reads it, from L2 when it is
// there). The keep-mask does not apply to g here: grad_rows never masks the g it multiplies.
// Smem: g 64 x 72, W hi / lo 64 x 72, φ(S) hi / lo 64 x 72, all in g's type: 45 KB.

constexpr int kGtBM = kRowBM;   // 64 rows of g per block
constexpr int kGtBN = 64;       // columns of g per step
// 72 elements: 144-byte rows put the 16-byte pieces of 8 consecutive rows on disjoint banks
constexpr int kGtLD = kTcMaxBR + 8;
constexpr int kGtTileBytes = 64 * kGtLD * 2;
constexpr int kGtSmemFloats = 5 * kGtTileBytes / 4;
constexpr int gt_w_per_thread(int nt) { return kGtBN * nt * mma::kTile / kThreads; }
// the partials' accumulators per warp: rank tiles j = 2 q + warp / 4
constexpr int gt_part_tiles(int nt) { return (nt + 1) / 2; }
static_assert(kGtBM == 4 * mma::kTile && kGtBN == 4 * mma::kTile && kTcWarps == 8,
              "grad_rows_tc_block's warp layout");
static_assert(kGtTileBytes % mma::kAlignBytes == 0 && (16 * kGtLD * 2) % mma::kAlignBytes == 0,
              "tile areas and 16-row steps keep 32-byte alignment");
static_assert(kGtLD % mma::kLdmMultiple16 == 0, "WMMA ldm of 16-bit tiles");
static_assert(kTcWarps * gt_part_tiles(kTcMaxNT) * 256 * 4 <= 3 * kGtTileBytes,
              "partials scratch fits in the g and W areas");
static_assert(kTcWarps * kTcMaxNT * 256 * 4 <= 5 * kGtTileBytes, "G scratch fits");
static_assert(kGtSmemFloats >= kExpandSmemFloats && kGtSmemFloats >= kThreads + 16,
              "the dh expand and the exponent reduction reuse the buffer");
static_assert(kGtSmemFloats * 4 <= 48 * 1024, "static shared memory");
static_assert(kGtSmemFloats >= kEtSmemFloats, "the tensor-core expand of dh / z reuses the buffer");

template <int NT, typename T>
struct GtStage {
  ActTile<kGtBM, kGtBN, T> x;
  float w[gt_w_per_thread(NT)];
};

template <typename T>
LA_HOST_DEVICE ActSource<T> gt_g_source(const RowShrinkArgs<T>& a, int64_t m0, int64_t n0,
                                        bool vec_ok) {
  return ActSource<T>{a.x, a.N, m0, a.M, n0, a.N, vec_ok};
}

template <int NT, typename T>
LA_HOST_DEVICE void gt_load_stage(const RowShrinkArgs<T>& a, GtStage<NT, T>& st, int64_t m0,
                                  int64_t n0, int64_t j0, int64_t ranks, bool vec_ok, int tid) {
  load_act_tile(st.x, gt_g_source(a, m0, n0, vec_ok), tid);
  constexpr int cols = NT * mma::kTile;
  LA_UNROLL
  for (int i = 0; i < gt_w_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    const int64_t n = n0 + e / cols;
    const int jj = e % cols;
    st.w[i] = (n < a.N && jj < ranks) ? a.w[n * a.w_sn + (j0 + jj) * a.w_sr] : 0.f;
  }
}

template <int NT, typename T>
LA_HOST_DEVICE void gt_store_stage(const RowShrinkArgs<T>& a, const GtStage<NT, T>& st, T* xs,
                                   T* w_hi, T* w_lo, int64_t m0, int64_t n0, float w_mult,
                                   bool vec_ok, int tid) {
  store_act_tile(st.x, gt_g_source(a, m0, n0, vec_ok), a.drop, xs, kGtLD, tid);
  constexpr int cols = NT * mma::kTile;
  LA_UNROLL
  for (int i = 0; i < gt_w_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    store_hi_lo(w_hi, w_lo, (e / cols) * kGtLD + e % cols, st.w[i], w_mult);
  }
}

// row_shrink_block on the tensor cores: S (and, with a.part, the partials) of the block's 64
// rows of x, with x's keep-mask a.drop applied as it is staged (grad_rows passes none; the
// series forward its dropout of h). vec_ok: x 16-byte aligned and N a multiple of 8.
// NT: accumulators for 1, 2 or 4 rank tiles of 16 (tc_rank_tiles of the first rank tile).
template <int NT, typename T, typename Sync>
LA_HOST_DEVICE void row_shrink_tc_block(const RowShrinkArgs<T>& a, int64_t mb, bool vec_ok,
                                        int tid, float* smem, Sync& sync) {
  static_assert(NT >= 1 && NT <= kTcMaxNT, "rank tiles per block");
  constexpr int PJ = gt_part_tiles(NT);
  constexpr int cols = NT * mma::kTile;
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  T* xs = reinterpret_cast<T*>(base);
  T* w_hi = reinterpret_cast<T*>(base + kGtTileBytes);
  T* w_lo = reinterpret_cast<T*>(base + 2 * kGtTileBytes);
  T* p_hi = reinterpret_cast<T*>(base + 3 * kGtTileBytes);
  T* p_lo = reinterpret_cast<T*>(base + 4 * kGtTileBytes);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wrow = warp % 4;   // G: row tile; partials: column tile of the step
  const int whalf = warp / 4;  // G: k-steps 2 whalf, 2 whalf + 1; partials: rank tile parity
  const int64_t m0 = mb * kGtBM;
  const bool partials = a.part != nullptr;
  const int64_t rows = a.M - m0 < kGtBM ? a.M - m0 : kGtBM;

  for (int64_t j0 = 0; j0 < a.R; j0 += cols) {
    // rank tiles of this pass (the last may be narrower); block-uniform
    const int64_t ranks = a.R - j0 < cols ? a.R - j0 : cols;
    const int nt = static_cast<int>((ranks + mma::kTile - 1) / mma::kTile);
    int e_w = 0, e_h = 0;
    if (std::is_same<T, c10::Half>::value) {
      float mx = 0.f;
      for (int64_t e = tid; e < a.N * ranks; e += kThreads) {
        mx = fmaxf(mx, fabsf(a.w[(e / ranks) * a.w_sn + (j0 + e % ranks) * a.w_sr]));
      }
      e_w = tc_block_exponent(mx, tid, smem, sync);
      if (partials) {
        mx = 0.f;
        for (int64_t e = tid; e < rows * ranks; e += kThreads) {
          mx = fmaxf(mx, fabsf(activate(a.h[(m0 + e / ranks) * a.R + j0 + e % ranks], a.act)));
        }
        e_h = tc_block_exponent(mx, tid, smem, sync);
      }
    }
    const float w_mult = ldexpf(1.f, e_w);
    const float g_mult = a.out_scale * ldexpf(1.f, -e_w);
    const float h_mult = ldexpf(1.f, e_h);
    const float p_mult = ldexpf(1.f, -e_h);
    if (partials) {  // φ(S) of the block's rows, hi / lo, zero outside the matrix
      for (int e = tid; e < kGtBM * cols; e += kThreads) {
        const int mm = e / cols;
        const int jj = e % cols;
        const float hv = (mm < rows && jj < ranks)
                             ? activate(a.h[(m0 + mm) * a.R + j0 + jj], a.act) * h_mult
                             : 0.f;
        const T hi = T(hv);
        p_hi[mm * kGtLD + jj] = hi;
        p_lo[mm * kGtLD + jj] = T(hv - static_cast<float>(hi));
      }
    }

    mma::FragC acc[NT];
    LA_UNROLL
    for (int j = 0; j < NT; ++j) mma::fill_zero(acc[j]);

    GtStage<NT, T> st;
    gt_load_stage(a, st, m0, 0, j0, ranks, vec_ok, tid);
    for (int64_t n0 = 0; n0 < a.N; n0 += kGtBN) {
      gt_store_stage(a, st, xs, w_hi, w_lo, m0, n0, w_mult, vec_ok, tid);
      sync();
      if (n0 + kGtBN < a.N) gt_load_stage(a, st, m0, n0 + kGtBN, j0, ranks, vec_ok, tid);
      LA_UNROLL
      for (int kk = 0; kk < 2; ++kk) {
        const int ks = (2 * whalf + kk) * mma::kTile;
        mma::FragA<T> ga;
        mma::load_a(ga, xs + wrow * mma::kTile * kGtLD + ks, kGtLD);
        LA_UNROLL
        for (int j = 0; j < NT; ++j) {
          if (j >= nt) break;
          mma::FragBRow<T> wb;
          mma::load_b_row(wb, w_hi + ks * kGtLD + j * mma::kTile, kGtLD);
          mma::mma(acc[j], ga, wb);
          mma::load_b_row(wb, w_lo + ks * kGtLD + j * mma::kTile, kGtLD);
          mma::mma(acc[j], ga, wb);
        }
      }
      if (partials) {
        mma::FragC pacc[PJ];
        LA_UNROLL
        for (int q = 0; q < PJ; ++q) mma::fill_zero(pacc[q]);
        LA_UNROLL
        for (int ks = 0; ks < kGtBM; ks += mma::kTile) {
          mma::FragACol<T> gt;
          mma::load_a_col(gt, xs + ks * kGtLD + wrow * mma::kTile, kGtLD);
          LA_UNROLL
          for (int q = 0; q < PJ; ++q) {
            const int j = 2 * q + whalf;
            if (j >= nt) break;  // warp-uniform
            mma::FragBRow<T> pb;
            mma::load_b_row(pb, p_hi + ks * kGtLD + j * mma::kTile, kGtLD);
            mma::mma(pacc[q], gt, pb);
            mma::load_b_row(pb, p_lo + ks * kGtLD + j * mma::kTile, kGtLD);
            mma::mma(pacc[q], gt, pb);
          }
        }
        sync();  // the g and W tiles are read: their area holds the partials now
        float* scratch = smem + warp * PJ * mma::kTile * mma::kTile;
        LA_UNROLL
        for (int q = 0; q < PJ; ++q) {
          if (2 * q + whalf >= nt) break;
          mma::store_c(scratch + q * mma::kTile * mma::kTile, pacc[q], mma::kTile, lane);
        }
        sync();
        // part[mb, n, j0 + jj]: rows of the step's 64 columns, ranks contiguous
        for (int e = tid; e < kGtBN * cols; e += kThreads) {
          const int nn = e / cols;
          const int jj = e % cols;
          const int64_t n = n0 + nn;
          if (n >= a.N || jj >= ranks) continue;
          const int j = jj / mma::kTile;
          const int owner = nn / mma::kTile + 4 * (j % 2);
          const float v = smem[(owner * PJ + j / 2) * mma::kTile * mma::kTile +
                               (nn % mma::kTile) * mma::kTile + jj % mma::kTile];
          a.part[(mb * a.N + n) * a.R + j0 + jj] = v * p_mult;
        }
      }
      sync();
    }

    // G of the pass: the two k halves through shared memory, added in a fixed order
    LA_UNROLL
    for (int j = 0; j < NT; ++j) {
      if (j >= nt) break;
      mma::store_c(smem + (warp * NT + j) * mma::kTile * mma::kTile, acc[j], mma::kTile, lane);
    }
    sync();
    for (int e = tid; e < kGtBM * cols; e += kThreads) {
      const int mm = e / cols;
      const int jj = e % cols;
      if (mm >= rows || jj >= ranks) continue;
      const int within = (mm % mma::kTile) * mma::kTile + jj % mma::kTile;
      const int j = jj / mma::kTile;
      const float lo_half = smem[((mm / mma::kTile) * NT + j) * mma::kTile * mma::kTile + within];
      const float hi_half =
          smem[((mm / mma::kTile + 4) * NT + j) * mma::kTile * mma::kTile + within];
      a.s[(m0 + mm) * a.R + j0 + jj] =
          (lo_half + hi_half) * g_mult + (a.s_bias != nullptr ? a.s_bias[j0 + jj] : 0.f);
    }
    sync();
  }
}

template <int NT, typename T, typename Sync>
LA_HOST_DEVICE void grad_rows_tc_block(const GradRowsArgs<T>& args, int64_t mb, int tid,
                                       float* smem, Sync& sync) {
  row_shrink_tc_block<NT>(args.shrink, mb, args.vec_ok, tid, smem, sync);
  grad_rows_tail<true>(args, mb, tid, smem, sync);
}

// The fused series forward on the tensor cores (16-bit h; sm_80+): s_pre by row_shrink_tc_block
// (h's dropout applied as its tiles are staged), z by expand_tc_block over the block's rows.
template <int NT, typename T, typename Sync>
LA_HOST_DEVICE void series_fwd_tc_block(const SeriesFwdArgs<T>& a, int64_t mb, int tid,
                                        float* smem, Sync& sync) {
  row_shrink_tc_block<NT>(a.shrink, mb, a.vec_ok, tid, smem, sync);
  for (int64_t nb = 0; nb * kExpandBN < a.expand.N; ++nb) {
    expand_tc_block(a.expand, BlockIdx{mb, nb, 0}, tid, smem, sync);
  }
}

// out[i] = scaling · scale · Σ_z part[z, i], z in order (the second, tiny kernel of the
// one-pass reductions).
LA_HOST_DEVICE void sum_partials_at(float* out, const float* part, int64_t splits, int64_t count,
                                    int64_t i, const float* scale_ptr, float scaling) {
  float sum = 0.f;
  for (int64_t z = 0; z < splits; ++z) sum += part[z * count + i];
  const float scale = scale_ptr == nullptr ? scaling : scaling * scale_ptr[0];
  out[i] = sum * scale;
}

// Launchers (kernels.cu)
template <typename T>
int launch_series_fwd(const SeriesFwdArgs<T>& args, int64_t blocks, bool wide, void* stream);
// float16 / bfloat16 only; sm_80+; nt = tc_rank_tiles(tc_rank_tile(r))
template <typename T>
int launch_series_fwd_tc(const SeriesFwdArgs<T>& args, int64_t blocks, int nt, void* stream);
template <typename T>
int launch_grad_rows(const GradRowsArgs<T>& args, int64_t blocks, bool wide, void* stream);
// float16 / bfloat16 only; sm_80+; nt = tc_rank_tiles(tc_rank_tile(r))
template <typename T>
int launch_grad_rows_tc(const GradRowsArgs<T>& args, int64_t blocks, int nt, void* stream);
int launch_sum_partials(float* out, const float* part, int64_t splits, int64_t count,
                        const float* scale_ptr, float scaling, void* stream);

}  // namespace llm_adapters
