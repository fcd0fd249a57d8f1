// Tensor-core helpers shared by the *_tc_block kernels (float16 / bfloat16 activations;
// sm_80+): the warp geometry, the rank-tile choice and its NT instantiation, the staging of a
// 16-bit activation tile with its keep-mask, the hi / lo split of float32 operands in the
// activation's type, the block's power-of-two pre-scale for float16, and the accumulator
// epilogue. Why operands are split and pre-scaled, and the error that leaves: shrink_tc_block
// (shrink.cuh).
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace llm_adapters {

// A block: 8 warps of kTcWarpM = 32 rows (or columns) each, two 16-row A tiles per warp, and
// at most kTcMaxBR = 64 ranks: 1, 2 or 4 accumulator tiles of 16 (NT).
constexpr int kTcWarps = kThreads / 32;
constexpr int kTcWarpM = 2 * mma::kTile;
constexpr int kTcMaxBR = 64;
constexpr int kTcMaxNT = kTcMaxBR / mma::kTile;
// epilogue: each warp stores one 16x16 float accumulator at a time into a scratch tile inside
// the (then idle) x area
constexpr int kTcCLD = mma::kTile;

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

}  // namespace llm_adapters
