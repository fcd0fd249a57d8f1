// The adapter kernels, written once for device and host.
//
// Each kernel is a block function `*_block(args, block, tid, smem, sync)`: kernels.cu wraps it
// in a __global__ function (shared memory, threadIdx, __syncthreads), and emulate() in ops.cpp
// runs the very same function on CPU threads with a barrier, so CPU-only machines check the tiling,
// bounds and dropout indexing of the code that runs on the GPU. Only c10's Half / BFloat16
// headers are included: no ATen, which keeps the nvcc compile short.
//
//   shrink       S = D(x) wᵀ · out_scale                x [M, K], w [r, K] -> [splits, M, r]
//                (shrink_tc_block: the same on the tensor cores for 16-bit x, see mma.cuh)
//   expand       out = in + keep·scale·φ(H) wᵀ + bias    H [M, r], w [N, r] -> out [M, N]
//                (expand_tc_block: the rank product on the tensor cores for 16-bit out)
//   reduce_rows  Σ_m D(X)[m, n] φ(H[m, j])               X [M, N], H [M, r] -> [splits, N, r]
//                (reduce_rows_tc_block: on the tensor cores for 16-bit X)
//   series_fwd   row blocks: S = D(h) Dnᵀ, z = h + s·φ(S) Upᵀ + u_b
//                (series_fwd_tc_block: both products on the tensor cores for 16-bit h)
//   grad_rows    row blocks, one pass over g: G = g W, partials of gᵀφ(S), dS, [dh]
//                (grad_rows_tc_block: G, the partials and dh on the tensor cores for 16-bit g)
// Partials of split reductions are summed afterwards in a fixed order: no atomics anywhere.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <math.h>
#include <cstdint>
#include <type_traits>

#include "mma.cuh"
#include "philox.cuh"

#if defined(__CUDA_ARCH__)
#define LA_UNROLL _Pragma("unroll")
#define LA_NO_UNROLL _Pragma("unroll 1")
#else
#define LA_UNROLL
#define LA_NO_UNROLL
#endif

namespace llm_adapters {

constexpr int kThreads = 256;

struct BlockIdx {
  int64_t x, y, z;
};

// ----------------------------------------------------------------------------------------------
// 16-byte vector access
// ----------------------------------------------------------------------------------------------
// Loaded as an aligned struct of T (not as uint4 reinterpreted): the elements are read through
// their own type, which keeps the host build free of strict-aliasing surprises; nvcc emits one
// 128-bit load or store for the 16-byte aligned struct.

template <typename T>
struct Vec {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
};

template <typename T>
struct alignas(16) VecData {
  T v[Vec<T>::kSize];
};

template <typename T>
LA_HOST_DEVICE void load_vec(const T* p, float* out) {
  const VecData<T> raw = *reinterpret_cast<const VecData<T>*>(p);
  LA_UNROLL
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = static_cast<float>(raw.v[i]);
}

template <typename T>
LA_HOST_DEVICE void store_vec(T* p, const float* v) {
  VecData<T> raw;
  LA_UNROLL
  for (int i = 0; i < Vec<T>::kSize; ++i) raw.v[i] = static_cast<T>(v[i]);
  *reinterpret_cast<VecData<T>*>(p) = raw;
}

// ----------------------------------------------------------------------------------------------
// Branch non-linearities φ (codes as in llm_adapters/ops/cuda_backend.py)
// ----------------------------------------------------------------------------------------------

enum Activation : int { kIdentity = 0, kTanh = 1, kRelu = 2, kGelu = 3, kSilu = 4 };

LA_HOST_DEVICE float activate(float s, int act) {
  switch (act) {
    case kTanh:
      return tanhf(s);
    case kRelu:
      return s > 0.f ? s : 0.f;
    case kGelu:  // exact (erf) GELU, as torch.nn.functional.gelu
      return 0.5f * s * (1.f + erff(s * 0.70710678118654752f));
    case kSilu:
      return s / (1.f + expf(-s));
    default:
      return s;
  }
}

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

constexpr int kTcWarps = kThreads / 32;
constexpr int kTcWarpM = 2 * mma::kTile;
constexpr int kTcBM = kTcWarps * kTcWarpM;  // 256 rows per block
constexpr int kTcBK = 32;
constexpr int kTcMaxBR = 64;
constexpr int kTcMaxNT = kTcMaxBR / mma::kTile;
// Row stride of the staged tiles, in elements: 40 (80 bytes) is a multiple of 8 elements as
// WMMA requires, and the 8 rows of 16 bytes that one matrix load reads fall on disjoint banks
// (80-byte steps cover all 32 banks once). A tile's rows start at multiples of 16·80 bytes
// and its k sub-tiles at 32 bytes: every load_matrix_sync pointer is 32-byte aligned.
constexpr int kTcLD = kTcBK + 8;
constexpr int kTcXBytes = kTcBM * kTcLD * 2;
constexpr int kTcWBytes = kTcMaxBR * kTcLD * 2;
// epilogue: each warp stores one 16x16 float accumulator at a time into a scratch tile inside
// the (then idle) x area
constexpr int kTcCLD = mma::kTile;
constexpr int kTcSmemFloats = (kTcXBytes + 2 * kTcWBytes) / 4;
// w floats per thread: NT · 16 rank rows x kTcBK columns
constexpr int tc_w_per_thread(int nt) { return nt * mma::kTile * kTcBK / kThreads; }
static_assert(kTcXBytes % mma::kAlignBytes == 0 && kTcWBytes % mma::kAlignBytes == 0,
              "tile areas keep 32-byte alignment");
static_assert(kTcWarps * mma::kTile * kTcCLD * 4 <= kTcXBytes, "epilogue scratch fits");
static_assert(kTcLD % mma::kLdmMultiple16 == 0, "WMMA ldm of 16-bit tiles");

// Rank columns per block of the tensor-core shrink: r rounded up to 16, at most 64.
LA_HOST_DEVICE int tc_rank_tile(int64_t r) {
  const int64_t padded = (r + mma::kTile - 1) / mma::kTile * mma::kTile;
  return static_cast<int>(padded < kTcMaxBR ? padded : kTcMaxBR);
}

// The NT instantiation a rank tile of br columns runs: 1, 2 or 4 tiles of 16 ranks.
LA_HOST_DEVICE int tc_rank_tiles(int br) {
  return br <= mma::kTile ? 1 : (br <= 2 * mma::kTile ? 2 : kTcMaxNT);
}

// Calls f(std::integral_constant<int, NT>{}) with the NT instantiation that nt (1, 2 or 4
// rank tiles of 16) selects: one place that turns the run-time tile count into a template
// argument, for the launches (kernels.cu) and the host emulation (ops.cpp) alike.
template <typename F>
void with_rank_tiles(int nt, F&& f) {
  if (nt == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (nt == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, kTcMaxNT>{});
  }
}

// A ROWS x COLS tile of a row-major 16-bit activation x (leading dimension ld) at (r0, c0), on
// its way from global to shared memory in two steps, so that the global loads of the next tile
// are in flight during the MMAs of the current one: load_act_tile reads 16-byte vectors into
// registers, store_act_tile writes them to shared memory with the dropout keep-mask of each
// element's linear index r·ld + c applied (one Philox at a time: a rolled loop, as eight
// unrolled Philox chains would hold registers the accumulators need) and zeros outside
// [0, row_end) x [0, col_end). Without vec_ok (x not 16-byte aligned, or ld not a multiple of
// 8) load_act_tile does nothing and store_act_tile reads x element by element.
template <typename T>
struct ActSource {
  const T* x;
  int64_t ld, r0, row_end, c0, col_end;
  bool vec_ok;
};

template <int ROWS, int COLS, typename T>
struct ActTile {
  static constexpr int V = 8;
  static constexpr int kPerRow = COLS / V;
  static constexpr int kVecs = ROWS * COLS / V / kThreads;
  static_assert(Vec<T>::kSize == V && COLS % V == 0 && (ROWS * COLS) % (V * kThreads) == 0,
                "16-bit tiles, whole 16-byte vectors spread evenly over the threads");
  VecData<T> v[kVecs];
};

template <int ROWS, int COLS, typename T>
LA_HOST_DEVICE void load_act_tile(ActTile<ROWS, COLS, T>& t, const ActSource<T>& s, int tid) {
  using Tile = ActTile<ROWS, COLS, T>;
  if (!s.vec_ok) return;
  LA_UNROLL
  for (int i = 0; i < Tile::kVecs; ++i) {
    const int v = tid + i * kThreads;
    const int64_t r = s.r0 + v / Tile::kPerRow;
    const int64_t c = s.c0 + (v % Tile::kPerRow) * Tile::V;
    // ld % 8 == 0 and c0 % 8 == 0: a vector is wholly inside or wholly outside
    if (r < s.row_end && c < s.col_end) {
      t.v[i] = *reinterpret_cast<const VecData<T>*>(s.x + r * s.ld + c);
    }
  }
}

template <int ROWS, int COLS, typename T>
LA_HOST_DEVICE void store_act_tile(const ActTile<ROWS, COLS, T>& t, const ActSource<T>& s,
                                   const DropoutParams& drop, T* xs, int lds, int tid) {
  using Tile = ActTile<ROWS, COLS, T>;
  constexpr int V = Tile::V;
  const T zero = T(0.f);
  if (s.vec_ok) {
    LA_UNROLL
    for (int i = 0; i < Tile::kVecs; ++i) {
      const int v = tid + i * kThreads;
      const int rr = v / Tile::kPerRow;
      const int cc = (v % Tile::kPerRow) * V;
      const int64_t r = s.r0 + rr;
      const int64_t c = s.c0 + cc;
      VecData<T> val;
      if (r < s.row_end && c < s.col_end) {
        val = t.v[i];
        if (drop.enabled) {
          const uint64_t index = static_cast<uint64_t>(r * s.ld + c);
          unsigned keep = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll 1
#endif
          for (int e = 0; e < V; ++e) {
            keep |= static_cast<unsigned>(keep_element(drop, index + e)) << e;
          }
          LA_UNROLL
          for (int e = 0; e < V; ++e) {
            if (!((keep >> e) & 1u)) val.v[e] = zero;
          }
        }
      } else {
        LA_UNROLL
        for (int e = 0; e < V; ++e) val.v[e] = zero;
      }
      *reinterpret_cast<VecData<T>*>(xs + rr * lds + cc) = val;
    }
  } else {
    for (int e = tid; e < ROWS * COLS; e += kThreads) {
      const int rr = e / COLS;
      const int cc = e % COLS;
      const int64_t r = s.r0 + rr;
      const int64_t c = s.c0 + cc;
      T val = zero;
      if (r < s.row_end && c < s.col_end) {
        val = s.x[r * s.ld + c];
        if (drop.enabled && !keep_element(drop, static_cast<uint64_t>(r * s.ld + c))) val = zero;
      }
      xs[rr * lds + cc] = val;
    }
  }
}

// A float32 operand value v as the pair T(v·mult), T(rest) at hi[at], lo[at]: their sum is
// v·mult to about 16 significant bits (mult, a power of two, scales exactly).
template <typename T>
LA_HOST_DEVICE void store_hi_lo(T* hi, T* lo, int at, float v, float mult) {
  const float scaled = v * mult;
  const T h = T(scaled);
  hi[at] = h;
  lo[at] = T(scaled - static_cast<float>(h));
}

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

// The power of two e that brings a block's largest magnitude `mx` (the max over the threads'
// `local_max`) into [2^14, 2^15), clamped to [-100, 100] so that 2^e and 2^-e are normal
// floats (magnitudes below 2^-85 would lose precision; none are that small); 0 for an all-zero
// or non-finite block. `red`: kThreads + 16 floats of shared memory, free again on return.
template <typename Sync>
LA_HOST_DEVICE int tc_block_exponent(float local_max, int tid, float* red, Sync& sync) {
  red[tid] = local_max;
  sync();
  if (tid < 16) {
    float part = 0.f;
    for (int i = 0; i < kThreads / 16; ++i) part = fmaxf(part, red[tid * (kThreads / 16) + i]);
    red[kThreads + tid] = part;
  }
  sync();
  float mx = 0.f;
  for (int i = 0; i < 16; ++i) mx = fmaxf(mx, red[kThreads + i]);
  sync();  // red lies in the tile area, written next
  if (!(mx > 0.f) || mx > 3.0e38f) return 0;
  int exp2 = 0;
  frexpf(mx, &exp2);  // mx = f · 2^exp2, f in [0.5, 1)
  const int e = 15 - exp2;
  return e < -100 ? -100 : (e > 100 ? 100 : e);
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
// The epilogue of a warp's 2 x NT accumulator tiles (rows row0 + 16 i, ranks j0 + 16 j, the
// first nt rank tiles in use): one tile at a time through the warp's 16 x 16 float scratch,
// bounds-checked against [0, rows) x [0, ranks), times `mult`, into part [rows, ranks].
template <int NT, typename Sync>
LA_HOST_DEVICE void store_acc_tiles(const mma::FragC (&acc)[2][NT], int nt, float* scratch,
                                    float* part, int64_t row0, int64_t rows, int64_t j0,
                                    int64_t ranks, float mult, int lane, Sync& sync) {
  LA_UNROLL
  for (int i = 0; i < 2; ++i) {
    LA_UNROLL
    for (int j = 0; j < NT; ++j) {
      if (j >= nt) break;
      mma::store_c(scratch, acc[i][j], kTcCLD, lane);
      sync();
      for (int e = lane; e < mma::kTile * mma::kTile; e += 32) {
        const int64_t row = row0 + i * mma::kTile + e / mma::kTile;
        const int64_t jg = j0 + j * mma::kTile + e % mma::kTile;
        if (row < rows && jg < ranks) {
          part[row * ranks + jg] = scratch[(e / mma::kTile) * kTcCLD + e % mma::kTile] * mult;
        }
      }
      sync();
    }
  }
}

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

// ----------------------------------------------------------------------------------------------
// expand: out[m, n] = in[m, n] + keep(m, n)·scale·Σ_j φ(H[m, j]) w[n, j] + bias[n]
// ----------------------------------------------------------------------------------------------
// Tile: 64 rows x 128 columns; each thread owns 4 rows (ty + 16 i) x 8 contiguous columns, so
// its epilogue reads and writes 16-byte vectors of `in` / `out`. H (with φ) and w are staged
// kExpandRK rank columns at a time; the rank product is accumulated in float32 and the result
// rounded once, when added to `in`. `in` may be `out` (the in-place add into y = x Wᵀ).

constexpr int kExpandBM = 64;
constexpr int kExpandBN = 128;
constexpr int kExpandRK = 16;
constexpr int kExpandTM = 4;
constexpr int kExpandTN = 8;
// hs is [rank][row] padded by one so the staging stores spread over banks; ws rows are 132
// floats, which keeps them 16-byte aligned for the vector reads of the inner loop
constexpr int kExpandHLD = kExpandBM + 1;
constexpr int kExpandWLD = kExpandBN + 4;
constexpr int kExpandWOffset = ((kExpandRK * kExpandHLD + 3) / 4) * 4;
constexpr int kExpandSmemFloats = kExpandWOffset + kExpandRK * kExpandWLD;

template <typename T>
struct ExpandArgs {
  T* out;
  const T* in;  // may equal out
  int64_t M, N;
  const float* h;  // [M, R] contiguous
  int64_t R;
  int act;
  const float* w;  // [N, R] with strides (w_sn, w_sr)
  int64_t w_sn, w_sr;
  const float* bias;       // [N] or null
  const float* scale_ptr;  // one float on the device, or null
  float scaling;
  DropoutParams drop;
  bool vec_ok;  // in and out 16-byte aligned and N a multiple of the vector width
};

LA_HOST_DEVICE void load_f8(const float* p, float* out) {
#if defined(__CUDA_ARCH__)
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
#else
  for (int i = 0; i < 8; ++i) out[i] = p[i];
#endif
}

// The epilogue of an expand tile, shared by both variants: thread (tx = tid % 16, ty = tid / 16)
// owns rows m0 + ty + 16 i and the 8 columns n0 + 8 tx + c; acc[i][c] · mult is its part of
// φ(H) wᵀ. Adds keep · scaling · scale · acc · mult + bias to `in` and writes `out` (16-byte
// vectors where aligned).
template <typename T>
LA_HOST_DEVICE void expand_epilogue(const ExpandArgs<T>& a, int64_t m0, int64_t n0, int tid,
                                    const float (&acc)[kExpandTM][kExpandTN], float mult) {
  const int tx = tid % 16;
  const int ty = tid / 16;
  const float scale = (a.scale_ptr == nullptr ? a.scaling : a.scaling * a.scale_ptr[0]) * mult;
  const int64_t nb = n0 + tx * kExpandTN;
  LA_UNROLL
  for (int i = 0; i < kExpandTM; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= a.M) continue;
    float val[kExpandTN];
    LA_UNROLL
    for (int c = 0; c < kExpandTN; ++c) {
      const int64_t n = nb + c;
      float v = acc[i][c] * scale;
      if (a.drop.enabled && n < a.N &&
          !keep_element(a.drop, static_cast<uint64_t>(m * a.N + n))) {
        v = 0.f;
      }
      if (a.bias != nullptr && n < a.N) v += a.bias[n];
      val[c] = v;
    }
    const int64_t row = m * a.N;
    if (a.vec_ok && nb + kExpandTN <= a.N) {
      constexpr int V = Vec<T>::kSize;
      LA_UNROLL
      for (int c0 = 0; c0 < kExpandTN; c0 += V) {
        float base[V];
        load_vec(a.in + row + nb + c0, base);
        LA_UNROLL
        for (int c = 0; c < V; ++c) base[c] += val[c0 + c];
        store_vec(a.out + row + nb + c0, base);
      }
    } else {
      LA_UNROLL
      for (int c = 0; c < kExpandTN; ++c) {
        const int64_t n = nb + c;
        if (n < a.N) a.out[row + n] = static_cast<T>(static_cast<float>(a.in[row + n]) + val[c]);
      }
    }
  }
}


template <typename T, typename Sync>
LA_HOST_DEVICE void expand_block(const ExpandArgs<T>& a, BlockIdx block, int tid, float* smem,
                                 Sync& sync) {
  float* hs = smem;
  float* ws = smem + kExpandWOffset;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t m0 = block.x * kExpandBM;
  const int64_t n0 = block.y * kExpandBN;

  float acc[kExpandTM][kExpandTN];
  LA_UNROLL
  for (int i = 0; i < kExpandTM; ++i) {
    LA_UNROLL
    for (int c = 0; c < kExpandTN; ++c) acc[i][c] = 0.f;
  }

  for (int64_t j0 = 0; j0 < a.R; j0 += kExpandRK) {
    for (int e = tid; e < kExpandBM * kExpandRK; e += kThreads) {
      const int mm = e / kExpandRK;
      const int jj = e % kExpandRK;
      const int64_t m = m0 + mm;
      const int64_t j = j0 + jj;
      hs[jj * kExpandHLD + mm] = (m < a.M && j < a.R) ? activate(a.h[m * a.R + j], a.act) : 0.f;
    }
    for (int e = tid; e < kExpandBN * kExpandRK; e += kThreads) {
      const int nn = e / kExpandRK;
      const int jj = e % kExpandRK;
      const int64_t n = n0 + nn;
      const int64_t j = j0 + jj;
      ws[jj * kExpandWLD + nn] = (n < a.N && j < a.R) ? a.w[n * a.w_sn + j * a.w_sr] : 0.f;
    }
    sync();
    LA_UNROLL
    for (int jj = 0; jj < kExpandRK; ++jj) {
      float hv[kExpandTM];
      LA_UNROLL
      for (int i = 0; i < kExpandTM; ++i) hv[i] = hs[jj * kExpandHLD + ty + 16 * i];
      float wv[kExpandTN];
      load_f8(ws + jj * kExpandWLD + tx * kExpandTN, wv);
      LA_UNROLL
      for (int i = 0; i < kExpandTM; ++i) {
        LA_UNROLL
        for (int c = 0; c < kExpandTN; ++c) acc[i][c] += hv[i] * wv[c];
      }
    }
    sync();
  }

  expand_epilogue(a, m0, n0, tid, acc, 1.f);
}

// ----------------------------------------------------------------------------------------------
// expand on the tensor cores (float16 / bfloat16 out; sm_80+)
// ----------------------------------------------------------------------------------------------
// The same tile (64 rows x 128 columns, the same grid) and epilogue as expand_block; only the
// rank product φ(H) wᵀ runs as tile MMAs. At r = 16 the CUDA-core tile needs ~36 µs of an
// H100's float32 FMA peak per 16384 x 4096 output against ~80 µs for reading `in` and writing
// `out`, close enough that its shared-memory loads make it compute-bound; at the bottlenecks of
// series adapters (64 .. 256) the CUDA cores are 4-16x short of the bandwidth.
// Both operands are float32 (φ(H) and the adapter weight), so each is split into hi + lo parts
// in T (see store_hi_lo) and the product is hi·hi + hi·lo + lo·hi: three MMAs into one float32
// accumulator, what is dropped (lo·lo) at most 2^-18 |φ(H)| |w| for bfloat16. For float16 each
// operand is pre-scaled by the block's power of two (tc_block_exponent) and the product scaled
// back in the epilogue.
// Warps: 2 (rows, 32 each) x 4 (columns, 32 each); each holds 2 x 2 accumulator tiles. The rank
// is walked kEtRK = 32 at a time (see et_stage). After the last step the accumulators go through
// shared memory (a 64 x 128 float tile over the staging area) to the epilogue's thread layout.

constexpr int kEtRK = 32;
constexpr int kEtLD = kEtRK + 8;  // 80-byte rows, as kTcLD: WMMA's ldm and disjoint banks
constexpr int kEtHBytes = kExpandBM * kEtLD * 2;
constexpr int kEtWBytes = kExpandBN * kEtLD * 2;
constexpr int kEtCLD = kExpandBN + 4;  // float tile rows of 528 bytes: 32-byte aligned tiles
constexpr int kEtStageBytes = 2 * kEtHBytes + 2 * kEtWBytes;
constexpr int kEtCBytes = kExpandBM * kEtCLD * 4;
constexpr int kEtSmemFloats = (kEtStageBytes > kEtCBytes ? kEtStageBytes : kEtCBytes) / 4;
constexpr int kEtHPerThread = kExpandBM * kEtRK / kThreads;
constexpr int kEtWPerThread = kExpandBN * kEtRK / kThreads;
static_assert(kEtHBytes % mma::kAlignBytes == 0 && kEtWBytes % mma::kAlignBytes == 0 &&
                  (16 * kEtLD * 2) % mma::kAlignBytes == 0,
              "tile areas and 16-row steps keep 32-byte alignment");
static_assert((16 * kEtCLD * 4) % mma::kAlignBytes == 0 && kEtCLD % mma::kLdmMultipleF32 == 0,
              "accumulator tiles keep WMMA's float ldm and alignment");
static_assert(kEtLD % mma::kLdmMultiple16 == 0, "WMMA ldm of 16-bit tiles");
static_assert(kExpandBM == 2 * kTcWarpM && kExpandBN == 4 * kTcWarpM && kTcWarps == 8 &&
                  kExpandTM * 16 == kExpandBM && kExpandTN * 16 == kExpandBN,
              "expand_tc_block's warp and epilogue layouts");

// Global -> shared memory: φ(H) and w of rank columns [j0, j0 + kEtRK) as hi / lo parts (zeros
// outside the matrices). Straight through, not via registers across the MMAs as the shrink's
// staging: H and w are small and L2-resident, and the registers that a prefetch would hold
// are what keeps this kernel at two blocks per SM. Rolled loops: φ is a switch of transcendental
// functions, and eight inlined copies of it cost registers, too.
template <typename T>
LA_HOST_DEVICE void et_stage(const ExpandArgs<T>& a, T* h_hi, T* h_lo, T* w_hi, T* w_lo,
                             int64_t m0, int64_t n0, int64_t j0, float h_mult, float w_mult,
                             int tid) {
  LA_NO_UNROLL
  for (int i = 0; i < kEtHPerThread; ++i) {
    const int e = tid + i * kThreads;
    const int64_t m = m0 + e / kEtRK;
    const int64_t j = j0 + e % kEtRK;
    const float v = (m < a.M && j < a.R) ? activate(a.h[m * a.R + j], a.act) : 0.f;
    store_hi_lo(h_hi, h_lo, (e / kEtRK) * kEtLD + e % kEtRK, v, h_mult);
  }
  LA_NO_UNROLL
  for (int i = 0; i < kEtWPerThread; ++i) {
    const int e = tid + i * kThreads;
    const int64_t n = n0 + e / kEtRK;
    const int64_t j = j0 + e % kEtRK;
    const float v = (n < a.N && j < a.R) ? a.w[n * a.w_sn + j * a.w_sr] : 0.f;
    store_hi_lo(w_hi, w_lo, (e / kEtRK) * kEtLD + e % kEtRK, v, w_mult);
  }
}

template <typename T, typename Sync>
LA_HOST_DEVICE void expand_tc_block(const ExpandArgs<T>& a, BlockIdx block, int tid, float* smem,
                                    Sync& sync) {
  static_assert(sizeof(T) == 2, "the tensor-core expand takes 16-bit out");
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  T* h_hi = reinterpret_cast<T*>(base);
  T* h_lo = reinterpret_cast<T*>(base + kEtHBytes);
  T* w_hi = reinterpret_cast<T*>(base + 2 * kEtHBytes);
  T* w_lo = reinterpret_cast<T*>(base + 2 * kEtHBytes + kEtWBytes);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wm = warp % 2;  // rows 32 wm .. 32 wm + 31
  const int wn = warp / 2;  // columns 32 wn .. 32 wn + 31
  const int64_t m0 = block.x * kExpandBM;
  const int64_t n0 = block.y * kExpandBN;

  int e_h = 0, e_w = 0;
  if (std::is_same<T, c10::Half>::value) {
    const int64_t rows = a.M - m0 < kExpandBM ? a.M - m0 : kExpandBM;
    const int64_t cols = a.N - n0 < kExpandBN ? a.N - n0 : kExpandBN;
    float mx = 0.f;
    for (int64_t e = tid; e < rows * a.R; e += kThreads) {
      mx = fmaxf(mx, fabsf(activate(a.h[m0 * a.R + e], a.act)));
    }
    e_h = tc_block_exponent(mx, tid, smem, sync);
    mx = 0.f;
    for (int64_t e = tid; e < cols * a.R; e += kThreads) {
      mx = fmaxf(mx, fabsf(a.w[(n0 + e / a.R) * a.w_sn + (e % a.R) * a.w_sr]));
    }
    e_w = tc_block_exponent(mx, tid, smem, sync);
  }
  const float h_mult = ldexpf(1.f, e_h);
  const float w_mult = ldexpf(1.f, e_w);

  mma::FragC acc[2][2];
  LA_UNROLL
  for (int i = 0; i < 2; ++i) {
    LA_UNROLL
    for (int j = 0; j < 2; ++j) mma::fill_zero(acc[i][j]);
  }

  for (int64_t j0 = 0; j0 < a.R; j0 += kEtRK) {
    et_stage(a, h_hi, h_lo, w_hi, w_lo, m0, n0, j0, h_mult, w_mult, tid);
    sync();
    // one k-step of 16 at a time: the A fragments of both row tiles, then each column tile's B
    // fragments in turn (24 fragment registers live, not 64)
    LA_NO_UNROLL
    for (int ks = 0; ks < kEtRK; ks += mma::kTile) {
      mma::FragA<T> ha[2], la[2];
      LA_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int row = (wm * kTcWarpM + i * mma::kTile) * kEtLD + ks;
        mma::load_a(ha[i], h_hi + row, kEtLD);
        mma::load_a(la[i], h_lo + row, kEtLD);
      }
      LA_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int col = (wn * kTcWarpM + j * mma::kTile) * kEtLD + ks;
        mma::FragB<T> hb, lb;
        mma::load_b(hb, w_hi + col, kEtLD);
        mma::load_b(lb, w_lo + col, kEtLD);
        LA_UNROLL
        for (int i = 0; i < 2; ++i) {
          mma::mma(acc[i][j], ha[i], hb);
          mma::mma(acc[i][j], ha[i], lb);
          mma::mma(acc[i][j], la[i], hb);
        }
      }
    }
    sync();
  }

  // the accumulators into a 64 x 128 float tile over the (now idle) staging area
  float* ctile = smem;
  LA_UNROLL
  for (int i = 0; i < 2; ++i) {
    LA_UNROLL
    for (int j = 0; j < 2; ++j) {
      mma::store_c(ctile + (wm * kTcWarpM + i * mma::kTile) * kEtCLD + wn * kTcWarpM +
                       j * mma::kTile,
                   acc[i][j], kEtCLD, lane);
    }
  }
  sync();
  const int tx = tid % 16;
  const int ty = tid / 16;
  float out[kExpandTM][kExpandTN];
  LA_UNROLL
  for (int i = 0; i < kExpandTM; ++i) {
    load_f8(ctile + (ty + 16 * i) * kEtCLD + tx * kExpandTN, out[i]);
  }
  // times 2^-(e_h + e_w): exact where the product is a normal float32. Beyond that it is either
  // below 2^-96 (0 in a 16-bit out, as it becomes) or above 2^127 (an overflow in any case).
  expand_epilogue(a, m0, n0, tid, out, ldexpf(1.f, -(e_h + e_w)));
  sync();  // the block may go on to use the shared memory (series_fwd, grad_rows' dh)
}

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

// φ'(s), with the formulas of llm_adapters/ops/_activations.py
LA_HOST_DEVICE float activate_grad(float s, int act) {
  switch (act) {
    case kTanh: {
      const float t = tanhf(s);
      return 1.f - t * t;
    }
    case kRelu:
      return s > 0.f ? 1.f : 0.f;
    case kGelu: {
      const float cdf = 0.5f * (1.f + erff(s * 0.70710678118654752f));
      const float pdf = 0.39894228040143268f * expf(-0.5f * s * s);
      return cdf + s * pdf;
    }
    case kSilu: {
      const float sig = 1.f / (1.f + expf(-s));
      return sig * (1.f + s * (1.f - sig));
    }
    default:
      return 1.f;
  }
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

// ----------------------------------------------------------------------------------------------
// Launchers (kernels.cu): grid as (x, y, z) block counts; return the launch's cudaError_t as int
// ----------------------------------------------------------------------------------------------

struct Grid {
  int64_t x, y, z;
};

template <typename T>
int launch_shrink(const ShrinkArgs<T>& args, Grid grid, void* stream);
// float16 / bfloat16 only; sm_80+ (ops.cpp checks the device); nt = tc_rank_tiles(br)
template <typename T>
int launch_shrink_tc(const ShrinkArgs<T>& args, Grid grid, int nt, void* stream);
template <typename T>
int launch_expand(const ExpandArgs<T>& args, Grid grid, void* stream);
template <typename T>
int launch_reduce_rows(const ReduceArgs<T>& args, Grid grid, void* stream);
// float16 / bfloat16 only; sm_80+; nt = tc_rank_tiles(br)
template <typename T>
int launch_reduce_rows_tc(const ReduceArgs<T>& args, Grid grid, int nt, void* stream);
// float16 / bfloat16 only; sm_80+
template <typename T>
int launch_expand_tc(const ExpandArgs<T>& args, Grid grid, void* stream);
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
int launch_keep_mask(bool* out, int64_t numel, DropoutParams drop, void* stream);

}  // namespace llm_adapters
