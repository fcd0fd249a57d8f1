// shrink: S = D(x) wᵀ · out_scale, on the CUDA cores (shrink_block) and on the tensor cores
// for 16-bit x (shrink_tc_block).
#pragma once

#include "common.cuh"
#include "tc.cuh"

namespace llm_adapters {

// ----------------------------------------------------------------------------------------------
// shrink: S = D(x) wᵀ · out_scale
// ----------------------------------------------------------------------------------------------
// Tile: bm rows x br rank columns (br = 8..64, a power of two >= r). Each thread owns a register
// tile of kShrinkTM rows x tj rank columns: rows rg + groups·i, columns jt + jthreads·c, so per
// step of k it reads tj + 8 floats of shared memory for 8·tj multiply-adds (tj = 4 from r > 8
// on; with one column per thread the loop would be bound by shared-memory loads, not FMAs).
// x is staged kShrinkBK columns at a time, converted to float with the dropout keep-mask applied
// on the way in (regenerated from the seed; never stored).

constexpr int kShrinkTM = 8;    // rows per thread
constexpr int kShrinkMaxTJ = 4;  // rank columns per thread
constexpr int kShrinkBK = 16;
constexpr int kShrinkMaxBM = 512;
constexpr int kShrinkMaxBR = 64;
// +1 column of padding (17 is odd): the rows and rank columns a warp reads at one k fall in
// different banks
constexpr int kShrinkLD = kShrinkBK + 1;
constexpr int kShrinkSmemFloats = (kShrinkMaxBM + kShrinkMaxBR) * kShrinkLD;

// The thread layout of a rank tile: columns per thread, threads across the columns, rows.
struct ShrinkLayout {
  int tj, jthreads, groups, bm;
};

LA_HOST_DEVICE ShrinkLayout shrink_layout(int br) {
  ShrinkLayout l;
  l.tj = br <= 8 ? 2 : kShrinkMaxTJ;                    // br 8 -> 2, else 4
  l.jthreads = br / l.tj;                                 // 4, 4, 8, 16
  l.groups = kThreads / l.jthreads;                       // 64, 64, 32, 16
  l.bm = l.groups * kShrinkTM;                            // 512, 512, 256, 128
  return l;
}

template <typename T>
struct ShrinkArgs {
  const T* x;
  int64_t M, K;
  const float* w;  // [R, K] with strides (w_sr, w_sk)
  int64_t w_sr, w_sk, R;
  float* out;  // [splits, M, R]
  int br;
  int64_t k_per_split;  // a multiple of kShrinkBK
  DropoutParams drop;
  float out_scale;
  bool vec_ok;  // x 16-byte aligned and K a multiple of the vector width
};

template <typename T, typename Sync>
LA_HOST_DEVICE void shrink_block(const ShrinkArgs<T>& a, BlockIdx block, int tid, float* smem,
                                 Sync& sync) {
  constexpr int LD = kShrinkLD;
  float* xs = smem;
  float* ws = smem + kShrinkMaxBM * LD;
  const ShrinkLayout l = shrink_layout(a.br);
  const int jt = tid % l.jthreads;
  const int rg = tid / l.jthreads;
  const int64_t m0 = block.x * l.bm;
  const int64_t j0 = block.y * a.br;
  const int64_t k_begin = block.z * a.k_per_split;
  const int64_t k_end = a.K < k_begin + a.k_per_split ? a.K : k_begin + a.k_per_split;

  float acc[kShrinkTM][kShrinkMaxTJ];
  LA_UNROLL
  for (int i = 0; i < kShrinkTM; ++i) {
    LA_UNROLL
    for (int c = 0; c < kShrinkMaxTJ; ++c) acc[i][c] = 0.f;
  }

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kShrinkBK) {
    if (a.vec_ok) {
      constexpr int V = Vec<T>::kSize;
      constexpr int per_row = kShrinkBK / V;
      for (int v = tid; v < l.bm * per_row; v += kThreads) {
        const int mm = v / per_row;
        const int kk = (v % per_row) * V;
        const int64_t m = m0 + mm;
        const int64_t k = k0 + kk;
        float vals[V];
        // K % V == 0 and k0 % V == 0: a vector is wholly inside or wholly outside
        if (m < a.M && k < k_end) {
          load_vec(a.x + m * a.K + k, vals);
          if (a.drop.enabled) {
            LA_UNROLL
            for (int i = 0; i < V; ++i) {
              if (!keep_element(a.drop, static_cast<uint64_t>(m * a.K + k + i))) vals[i] = 0.f;
            }
          }
        } else {
          LA_UNROLL
          for (int i = 0; i < V; ++i) vals[i] = 0.f;
        }
        LA_UNROLL
        for (int i = 0; i < V; ++i) xs[mm * LD + kk + i] = vals[i];
      }
    } else {
      for (int e = tid; e < l.bm * kShrinkBK; e += kThreads) {
        const int mm = e / kShrinkBK;
        const int kk = e % kShrinkBK;
        const int64_t m = m0 + mm;
        const int64_t k = k0 + kk;
        float val = 0.f;
        if (m < a.M && k < k_end) {
          val = static_cast<float>(a.x[m * a.K + k]);
          if (a.drop.enabled && !keep_element(a.drop, static_cast<uint64_t>(m * a.K + k))) {
            val = 0.f;
          }
        }
        xs[mm * LD + kk] = val;
      }
    }
    for (int e = tid; e < a.br * kShrinkBK; e += kThreads) {
      const int jj = e / kShrinkBK;
      const int kk = e % kShrinkBK;
      const int64_t jg = j0 + jj;
      const int64_t k = k0 + kk;
      ws[jj * LD + kk] = (jg < a.R && k < k_end) ? a.w[jg * a.w_sr + k * a.w_sk] : 0.f;
    }
    sync();
    LA_UNROLL
    for (int kk = 0; kk < kShrinkBK; ++kk) {
      float wv[kShrinkMaxTJ];
      LA_UNROLL
      for (int c = 0; c < kShrinkMaxTJ; ++c) {
        wv[c] = c < l.tj ? ws[(jt + l.jthreads * c) * LD + kk] : 0.f;
      }
      LA_UNROLL
      for (int i = 0; i < kShrinkTM; ++i) {
        const float xv = xs[(rg + l.groups * i) * LD + kk];
        LA_UNROLL
        for (int c = 0; c < kShrinkMaxTJ; ++c) acc[i][c] += xv * wv[c];
      }
    }
    sync();
  }

  float* part = a.out + block.z * a.M * a.R;
  LA_UNROLL
  for (int c = 0; c < kShrinkMaxTJ; ++c) {
    const int64_t jg = j0 + jt + l.jthreads * c;
    if (c >= l.tj || jg >= a.R) continue;
    LA_UNROLL
    for (int i = 0; i < kShrinkTM; ++i) {
      const int64_t m = m0 + rg + l.groups * i;
      if (m < a.M) part[m * a.R + jg] = acc[i][c] * a.out_scale;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// shrink on the tensor cores (float16 / bfloat16 x; sm_80+)
// ----------------------------------------------------------------------------------------------
// The same S = D(x) wᵀ · out_scale with 16x16x16 tile MMAs (mma.cuh: nvcuda::wmma on the
// device, a host fragment of the same semantics in the CPU emulation). At K = 4096, r = 16 the
// CUDA-core kernel needs ~54 TFLOP/s of float32 FMA to read x at an H100's 3.35 TB/s; on the
// tensor cores the multiply is cheap and the kernel can be bound by the read of x.
//
// Block: 8 warps x kTcWarpM = 32 rows (two 16-row A tiles per warp, so every B fragment
// loaded from shared memory serves two MMAs and the w staged per row of x halves) x all rank
// tiles of the block's rank range (br <= 64: NT = 1, 2 or 4 accumulators of 16 ranks per A
// tile; NT is a template argument, so r <= 16 holds 16 accumulator registers, not 64).
// x is staged kTcBK = 32 columns at a time in its own type, the keep-mask applied on the way
// in (element index m*K + k, as the CUDA-core kernel); the next tile of x and w is loaded into
// registers before the MMAs of the current one, so the global loads overlap them.
//
// w is float32 (adapter weights are trained in float32); rounding it once to T would add an
// error of up to 2^-9 |w| (bfloat16) that the CUDA-core kernel does not have. It is split
// w = w_hi + w_lo with both in T (w_hi = T(w), w_lo = T(w - w_hi), the difference exact in
// float32) and both go through the MMA into the same float32 accumulator: what is left of w is
// at most 2^-18 |w| (bfloat16) / 2^-22 |w| (float16). Twice the tensor-core work, which the
// read of x still hides.
// float16 has a narrow exponent: LoRA weights of ~1e-4 would put w_lo below its normal range
// (and w_hi near it). The block therefore scales its w slice by 2^e so that its largest
// magnitude lands in [2^14, 2^15) (no overflow: 2^15 · 65504 and its sums stay far inside
// float32) and multiplies the result by 2^-e; power-of-two scaling is exact. This costs one
// extra read of the block's w slice (L2-resident: r·K floats against 256·K elements of x).
// Splits of K over blockIdx.z write partials summed in a fixed order, as the CUDA-core kernel.

constexpr int kTcBM = kTcWarps * kTcWarpM;  // 256 rows per block
constexpr int kTcBK = 32;
// Row stride of the staged tiles, in elements: 40 (80 bytes) is a multiple of 8 elements as
// WMMA requires, and the 8 rows of 16 bytes that one matrix load reads fall on disjoint banks
// (80-byte steps cover all 32 banks once). A tile's rows start at multiples of 16·80 bytes
// and its k sub-tiles at 32 bytes: every load_matrix_sync pointer is 32-byte aligned.
constexpr int kTcLD = kTcBK + 8;
constexpr int kTcXBytes = kTcBM * kTcLD * 2;
constexpr int kTcWBytes = kTcMaxBR * kTcLD * 2;
constexpr int kTcSmemFloats = (kTcXBytes + 2 * kTcWBytes) / 4;
// w floats per thread: NT · 16 rank rows x kTcBK columns
constexpr int tc_w_per_thread(int nt) { return nt * mma::kTile * kTcBK / kThreads; }
static_assert(kTcXBytes % mma::kAlignBytes == 0 && kTcWBytes % mma::kAlignBytes == 0,
              "tile areas keep 32-byte alignment");
static_assert(kTcWarps * mma::kTile * kTcCLD * 4 <= kTcXBytes, "epilogue scratch fits");
static_assert(kTcLD % mma::kLdmMultiple16 == 0, "WMMA ldm of 16-bit tiles");

// The next x and w tile, held in registers between the global loads and the shared stores.
template <int NT, typename T>
struct TcStage {
  ActTile<kTcBM, kTcBK, T> x;
  float w[tc_w_per_thread(NT)];
};

template <typename T>
LA_HOST_DEVICE ActSource<T> tc_x_source(const ShrinkArgs<T>& a, int64_t m0, int64_t k0,
                                        int64_t k_end) {
  return ActSource<T>{a.x, a.K, m0, a.M, k0, k_end, a.vec_ok};
}

// Global -> registers: the x tile (see load_act_tile) and this thread's w values.
template <int NT, typename T>
LA_HOST_DEVICE void tc_load_stage(const ShrinkArgs<T>& a, TcStage<NT, T>& st, int64_t m0, int64_t j0,
                                  int64_t k0, int64_t k_end, int tid) {
  load_act_tile(st.x, tc_x_source(a, m0, k0, k_end), tid);
  LA_UNROLL
  for (int i = 0; i < tc_w_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    const int64_t jg = j0 + e / kTcBK;
    const int64_t k = k0 + e % kTcBK;
    st.w[i] = (jg < a.R && k < k_end && e / kTcBK < a.br) ? a.w[jg * a.w_sr + k * a.w_sk] : 0.f;
  }
}

// Registers -> shared memory: x with the keep-mask (zeros outside the matrix), w as
// T(w·w_mult) and T(rest).
template <int NT, typename T>
LA_HOST_DEVICE void tc_store_stage(const ShrinkArgs<T>& a, const TcStage<NT, T>& st, T* xs, T* w_hi,
                                   T* w_lo, int64_t m0, int64_t k0, int64_t k_end, float w_mult,
                                   int tid) {
  store_act_tile(st.x, tc_x_source(a, m0, k0, k_end), a.drop, xs, kTcLD, tid);
  LA_UNROLL
  for (int i = 0; i < tc_w_per_thread(NT); ++i) {
    const int e = tid + i * kThreads;
    store_hi_lo(w_hi, w_lo, (e / kTcBK) * kTcLD + e % kTcBK, st.w[i], w_mult);
  }
}

// float16 only (see above): the exponent of the block's w slice; 0 for bfloat16, whose
// exponent range is float32's.
template <typename T, typename Sync>
LA_HOST_DEVICE int tc_weight_exponent(const ShrinkArgs<T>& a, int64_t j0, int64_t k_begin,
                                      int64_t k_end, int tid, float* red, Sync& sync) {
  if (!std::is_same<T, c10::Half>::value) return 0;
  const int64_t rows = a.R - j0 < a.br ? a.R - j0 : a.br;
  float mx = 0.f;
  for (int64_t jj = 0; jj < rows; ++jj) {
    for (int64_t k = k_begin + tid; k < k_end; k += kThreads) {
      mx = fmaxf(mx, fabsf(a.w[(j0 + jj) * a.w_sr + k * a.w_sk]));
    }
  }
  return tc_block_exponent(mx, tid, red, sync);
}

// NT: the most 16-rank tiles a block holds accumulators for (1, 2 or 4: br 16, 32, 64), a
// template argument so that r <= 16 keeps 16 accumulator registers per thread, not 64.
template <int NT, typename T, typename Sync>
LA_HOST_DEVICE void shrink_tc_block(const ShrinkArgs<T>& a, BlockIdx block, int tid, float* smem,
                                    Sync& sync) {
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  T* xs = reinterpret_cast<T*>(base);
  T* w_hi = reinterpret_cast<T*>(base + kTcXBytes);
  T* w_lo = reinterpret_cast<T*>(base + kTcXBytes + kTcWBytes);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t m0 = block.x * kTcBM;
  const int64_t j0 = block.y * a.br;
  const int64_t k_begin = block.z * a.k_per_split;
  const int64_t k_end = a.K < k_begin + a.k_per_split ? a.K : k_begin + a.k_per_split;
  // rank tiles of this block (the last rank block may be narrower than br); block-uniform
  const int64_t ranks = a.R - j0 < a.br ? a.R - j0 : a.br;
  const int nt = static_cast<int>((ranks + mma::kTile - 1) / mma::kTile);
  const int e_w = tc_weight_exponent(a, j0, k_begin, k_end, tid, smem, sync);
  const float w_mult = ldexpf(1.f, e_w);
  const float c_mult = a.out_scale * ldexpf(1.f, -e_w);

  static_assert(NT >= 1 && NT <= kTcMaxNT, "rank tiles per block");
  mma::FragC acc[2][NT];
  LA_UNROLL
  for (int i = 0; i < 2; ++i) {
    LA_UNROLL
    for (int j = 0; j < NT; ++j) mma::fill_zero(acc[i][j]);
  }

  TcStage<NT, T> st;
  tc_load_stage(a, st, m0, j0, k_begin, k_end, tid);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTcBK) {
    tc_store_stage(a, st, xs, w_hi, w_lo, m0, k0, k_end, w_mult, tid);
    sync();
    if (k0 + kTcBK < k_end) tc_load_stage(a, st, m0, j0, k0 + kTcBK, k_end, tid);
    LA_UNROLL
    for (int ks = 0; ks < kTcBK; ks += mma::kTile) {
      mma::FragA<T> xa[2];
      LA_UNROLL
      for (int i = 0; i < 2; ++i) {
        mma::load_a(xa[i], xs + (warp * kTcWarpM + i * mma::kTile) * kTcLD + ks, kTcLD);
      }
      LA_UNROLL
      for (int j = 0; j < NT; ++j) {
        if (j >= nt) break;
        mma::FragB<T> wb;
        mma::load_b(wb, w_hi + j * mma::kTile * kTcLD + ks, kTcLD);
        mma::mma(acc[0][j], xa[0], wb);
        mma::mma(acc[1][j], xa[1], wb);
        mma::load_b(wb, w_lo + j * mma::kTile * kTcLD + ks, kTcLD);
        mma::mma(acc[0][j], xa[0], wb);
        mma::mma(acc[1][j], xa[1], wb);
      }
    }
    sync();
  }

  // times out_scale · 2^-e_w (exact: |e_w| <= 100 keeps it a normal float)
  store_acc_tiles<NT>(acc, nt, smem + warp * mma::kTile * kTcCLD, a.out + block.z * a.M * a.R,
                      m0 + warp * kTcWarpM, a.M, j0, a.R, c_mult, lane, sync);
}

// Launchers (kernels.cu)
template <typename T>
int launch_shrink(const ShrinkArgs<T>& args, Grid grid, void* stream);
// float16 / bfloat16 only; sm_80+ (ops.cpp checks the device); nt = tc_rank_tiles(br)
template <typename T>
int launch_shrink_tc(const ShrinkArgs<T>& args, Grid grid, int nt, void* stream);

}  // namespace llm_adapters
