// reduce_rows: Σ_m D(X)[m, n] φ(H[m, j]) per split of M, on the CUDA cores (reduce_rows_block,
// the shrink's thread layout) and on the tensor cores for 16-bit X (reduce_rows_tc_block).
#pragma once

#include "common.cuh"
#include "shrink.cuh"  // shrink_layout
#include "tc.cuh"

namespace llm_adapters {

// ----------------------------------------------------------------------------------------------
// reduce_rows: out[n, j] = Σ_m D(X)[m, n] φ(H[m, j])   (per split of M)
// ----------------------------------------------------------------------------------------------
// Tile: bn columns of X x br rank columns, with the thread layout of the shrink (shrink_layout:
// kShrinkTM columns n x tj rank columns per thread, bn = its bm). X is staged kReduceBM rows at
// a time with the keep-mask applied; H with φ applied.

constexpr int kReduceBM = 16;
constexpr int kReduceMaxBN = kShrinkMaxBM;
constexpr int kReduceMaxBR = 64;
constexpr int kReduceXLD = kReduceMaxBN + 1;  // odd stride: a warp's columns spread over banks
constexpr int kReduceHLD = kReduceMaxBR + 1;  // odd stride: a warp's rank columns spread, too
constexpr int kReduceSmemFloats = kReduceBM * kReduceXLD + kReduceBM * kReduceHLD;

template <typename T>
struct ReduceArgs {
  const T* x;  // [M, N] contiguous
  int64_t M, N;
  const float* h;  // [M, R] contiguous
  int64_t R;
  int act;
  float* out;  // [splits, N, R]
  int br;
  int64_t rows_per_split;  // a multiple of kReduceBM
  DropoutParams drop;
  bool vec_ok;
};

template <typename T, typename Sync>
LA_HOST_DEVICE void reduce_rows_block(const ReduceArgs<T>& a, BlockIdx block, int tid,
                                      float* smem, Sync& sync) {
  float* xs = smem;
  float* hs = smem + kReduceBM * kReduceXLD;
  const ShrinkLayout l = shrink_layout(a.br);
  const int bn = l.bm;
  const int jt = tid % l.jthreads;
  const int cg = tid / l.jthreads;  // thread owns columns cg, cg + groups, ...
  const int64_t n0 = block.x * bn;
  const int64_t j0 = block.y * a.br;
  const int64_t m_begin = block.z * a.rows_per_split;
  const int64_t m_end = a.M < m_begin + a.rows_per_split ? a.M : m_begin + a.rows_per_split;

  float acc[kShrinkTM][kShrinkMaxTJ];
  LA_UNROLL
  for (int i = 0; i < kShrinkTM; ++i) {
    LA_UNROLL
    for (int c = 0; c < kShrinkMaxTJ; ++c) acc[i][c] = 0.f;
  }

  for (int64_t mb = m_begin; mb < m_end; mb += kReduceBM) {
    if (a.vec_ok) {
      constexpr int V = Vec<T>::kSize;
      const int per_row = bn / V;
      for (int v = tid; v < kReduceBM * per_row; v += kThreads) {
        const int mm = v / per_row;
        const int nn = (v % per_row) * V;
        const int64_t m = mb + mm;
        const int64_t n = n0 + nn;
        float vals[V];
        // N % V == 0 and n0 % V == 0: a vector is wholly inside or wholly outside
        if (m < m_end && n < a.N) {
          load_vec(a.x + m * a.N + n, vals);
          if (a.drop.enabled) {
            LA_UNROLL
            for (int i = 0; i < V; ++i) {
              if (!keep_element(a.drop, static_cast<uint64_t>(m * a.N + n + i))) vals[i] = 0.f;
            }
          }
        } else {
          LA_UNROLL
          for (int i = 0; i < V; ++i) vals[i] = 0.f;
        }
        LA_UNROLL
        for (int i = 0; i < V; ++i) xs[mm * kReduceXLD + nn + i] = vals[i];
      }
    } else {
      for (int e = tid; e < kReduceBM * bn; e += kThreads) {
        const int mm = e / bn;
        const int nn = e % bn;
        const int64_t m = mb + mm;
        const int64_t n = n0 + nn;
        float val = 0.f;
        if (m < m_end && n < a.N) {
          val = static_cast<float>(a.x[m * a.N + n]);
          if (a.drop.enabled && !keep_element(a.drop, static_cast<uint64_t>(m * a.N + n))) {
            val = 0.f;
          }
        }
        xs[mm * kReduceXLD + nn] = val;
      }
    }
    for (int e = tid; e < kReduceBM * a.br; e += kThreads) {
      const int mm = e / a.br;
      const int jj = e % a.br;
      const int64_t m = mb + mm;
      const int64_t jg = j0 + jj;
      hs[mm * kReduceHLD + jj] =
          (m < m_end && jg < a.R) ? activate(a.h[m * a.R + jg], a.act) : 0.f;
    }
    sync();
    LA_UNROLL
    for (int mm = 0; mm < kReduceBM; ++mm) {
      float hv[kShrinkMaxTJ];
      LA_UNROLL
      for (int c = 0; c < kShrinkMaxTJ; ++c) {
        hv[c] = c < l.tj ? hs[mm * kReduceHLD + jt + l.jthreads * c] : 0.f;
      }
      LA_UNROLL
      for (int i = 0; i < kShrinkTM; ++i) {
        const float xv = xs[mm * kReduceXLD + cg + l.groups * i];
        LA_UNROLL
        for (int c = 0; c < kShrinkMaxTJ; ++c) acc[i][c] += xv * hv[c];
      }
    }
    sync();
  }

  float* part = a.out + block.z * a.N * a.R;
  LA_UNROLL
  for (int c = 0; c < kShrinkMaxTJ; ++c) {
    const int64_t jg = j0 + jt + l.jthreads * c;
    if (c >= l.tj || jg >= a.R) continue;
    LA_UNROLL
    for (int i = 0; i < kShrinkTM; ++i) {
      const int64_t n = n0 + cg + l.groups * i;
      if (n < a.N) part[n * a.R + jg] = acc[i][c];
    }
  }
}

// ----------------------------------------------------------------------------------------------
// reduce_rows on the tensor cores (float16 / bfloat16 X; sm_80+)
// ----------------------------------------------------------------------------------------------
// out[n, j] = Σ_m D(X)[m, n] φ(H[m, j]) as the tile product Xᵀ φ(H): the shrink's scheme
// transposed. A block covers kRtBN = 256 columns n (8 warps x 32: two 16-column A tiles per
// warp, read column-major from the staged rows of X) x the rank tiles of its rank range, and
// walks its split of M kRtBM = 32 rows at a time: the tile of X in its own type with the
// keep-mask applied (element index m*N + n), φ(H) split into hi + lo parts in X's type as w is
// in the shrink (with the block's power-of-two pre-scaling for float16: dS has no fixed
// magnitude). The next tile is loaded into registers before the MMAs of the current one.

constexpr int kRtBN = kTcWarps * kTcWarpM;  // 256 columns n per block
constexpr int kRtBM = 32;                   // rows m per step
// 264 elements (528 bytes = 132 words: 8 consecutive rows fall 4 banks apart, so the 16-byte
// pieces one column-major load takes from 8 rows cover all 32 banks once); 72 for φ(H)
constexpr int kRtXLD = kRtBN + 8;
constexpr int kRtHLD = kTcMaxBR + 8;
constexpr int kRtXBytes = kRtBM * kRtXLD * 2;
constexpr int kRtHBytes = kRtBM * kRtHLD * 2;
constexpr int kRtSmemFloats = (kRtXBytes + 2 * kRtHBytes) / 4;
constexpr int rt_h_per_thread(int nt) { return kRtBM * nt * mma::kTile / kThreads; }
static_assert(kRtXBytes % mma::kAlignBytes == 0 && kRtHBytes % mma::kAlignBytes == 0,
              "tile areas keep 32-byte alignment");
static_assert((16 * kRtXLD * 2) % mma::kAlignBytes == 0 && (16 * kRtHLD * 2) % 32 == 0,
              "16-row steps keep 32-byte alignment");
static_assert(kTcWarps * mma::kTile * kTcCLD * 4 <= kRtXBytes, "epilogue scratch fits");
static_assert(kRtXLD % mma::kLdmMultiple16 == 0 && kRtHLD % mma::kLdmMultiple16 == 0,
              "WMMA ldm of 16-bit tiles");

template <int NT, typename T>
struct RtStage {
  ActTile<kRtBM, kRtBN, T> x;
  float h[rt_h_per_thread(NT)];  // φ(H), zero outside the matrix
};

template <typename T>
LA_HOST_DEVICE ActSource<T> rt_x_source(const ReduceArgs<T>& a, int64_t n0, int64_t mb,
                                        int64_t m_end) {
  return ActSource<T>{a.x, a.N, mb, m_end, n0, a.N, a.vec_ok};
}

template <int NT, typename T>
LA_HOST_DEVICE void rt_load_stage(const ReduceArgs<T>& a, RtStage<NT, T>& st, int64_t n0,
                                  int64_t j0, int64_t mb, int64_t m_end, int tid) {
  load_act_tile(st.x, rt_x_source(a, n0, mb, m_end), tid);
  constexpr int cols = NT * mma::kTile;
  LA_UNROLL
  for (int i = 0; i < rt_h_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    const int64_t m = mb + e / cols;
    const int64_t jg = j0 + e % cols;
    st.h[i] = (m < m_end && jg < a.R && e % cols < a.br) ? activate(a.h[m * a.R + jg], a.act)
                                                        : 0.f;
  }
}

template <int NT, typename T>
LA_HOST_DEVICE void rt_store_stage(const ReduceArgs<T>& a, const RtStage<NT, T>& st, T* xs,
                                   T* h_hi, T* h_lo, int64_t n0, int64_t mb, int64_t m_end,
                                   float h_mult, int tid) {
  store_act_tile(st.x, rt_x_source(a, n0, mb, m_end), a.drop, xs, kRtXLD, tid);
  constexpr int cols = NT * mma::kTile;
  LA_UNROLL
  for (int i = 0; i < rt_h_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    store_hi_lo(h_hi, h_lo, (e / cols) * kRtHLD + e % cols, st.h[i], h_mult);
  }
}

// NT as in shrink_tc_block: accumulators for 1, 2 or 4 rank tiles of 16.
template <int NT, typename T, typename Sync>
LA_HOST_DEVICE void reduce_rows_tc_block(const ReduceArgs<T>& a, BlockIdx block, int tid,
                                         float* smem, Sync& sync) {
  static_assert(NT >= 1 && NT <= kTcMaxNT, "rank tiles per block");
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  T* xs = reinterpret_cast<T*>(base);
  T* h_hi = reinterpret_cast<T*>(base + kRtXBytes);
  T* h_lo = reinterpret_cast<T*>(base + kRtXBytes + kRtHBytes);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t n0 = block.x * kRtBN;
  const int64_t j0 = block.y * a.br;
  const int64_t m_begin = block.z * a.rows_per_split;
  const int64_t m_end = a.M < m_begin + a.rows_per_split ? a.M : m_begin + a.rows_per_split;
  const int64_t ranks = a.R - j0 < a.br ? a.R - j0 : a.br;
  const int nt = static_cast<int>((ranks + mma::kTile - 1) / mma::kTile);

  int e_h = 0;
  if (std::is_same<T, c10::Half>::value) {
    float mx = 0.f;
    for (int64_t m = m_begin + tid / 16; m < m_end; m += kThreads / 16) {
      for (int64_t jj = tid % 16; jj < ranks; jj += 16) {
        mx = fmaxf(mx, fabsf(activate(a.h[m * a.R + j0 + jj], a.act)));
      }
    }
    e_h = tc_block_exponent(mx, tid, smem, sync);
  }
  const float h_mult = ldexpf(1.f, e_h);
  const float c_mult = ldexpf(1.f, -e_h);

  mma::FragC acc[2][NT];
  LA_UNROLL
  for (int i = 0; i < 2; ++i) {
    LA_UNROLL
    for (int j = 0; j < NT; ++j) mma::fill_zero(acc[i][j]);
  }

  RtStage<NT, T> st;
  rt_load_stage(a, st, n0, j0, m_begin, m_end, tid);
  for (int64_t mb = m_begin; mb < m_end; mb += kRtBM) {
    rt_store_stage(a, st, xs, h_hi, h_lo, n0, mb, m_end, h_mult, tid);
    sync();
    if (mb + kRtBM < m_end) rt_load_stage(a, st, n0, j0, mb + kRtBM, m_end, tid);
    LA_UNROLL
    for (int ks = 0; ks < kRtBM; ks += mma::kTile) {
      mma::FragACol<T> xa[2];
      LA_UNROLL
      for (int i = 0; i < 2; ++i) {
        mma::load_a_col(xa[i], xs + ks * kRtXLD + warp * kTcWarpM + i * mma::kTile, kRtXLD);
      }
      LA_UNROLL
      for (int j = 0; j < NT; ++j) {
        if (j >= nt) break;
        mma::FragBRow<T> hb;
        mma::load_b_row(hb, h_hi + ks * kRtHLD + j * mma::kTile, kRtHLD);
        mma::mma(acc[0][j], xa[0], hb);
        mma::mma(acc[1][j], xa[1], hb);
        mma::load_b_row(hb, h_lo + ks * kRtHLD + j * mma::kTile, kRtHLD);
        mma::mma(acc[0][j], xa[0], hb);
        mma::mma(acc[1][j], xa[1], hb);
      }
    }
    sync();
  }

  // [n][j] tiles, times 2^-e_h
  store_acc_tiles<NT>(acc, nt, smem + warp * mma::kTile * kTcCLD, a.out + block.z * a.N * a.R,
                      n0 + warp * kTcWarpM, a.N, j0, a.R, c_mult, lane, sync);
}

// Launchers (kernels.cu)
template <typename T>
int launch_reduce_rows(const ReduceArgs<T>& args, Grid grid, void* stream);
// float16 / bfloat16 only; sm_80+; nt = tc_rank_tiles(br)
template <typename T>
int launch_reduce_rows_tc(const ReduceArgs<T>& args, Grid grid, int nt, void* stream);

}  // namespace llm_adapters
