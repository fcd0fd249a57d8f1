// expand: out = in + keep·scale·φ(H) wᵀ + bias, on the CUDA cores (expand_block) and with the
// rank product on the tensor cores for 16-bit out (expand_tc_block); with a column scale c,
// DoRA's epilogue out = c ⊙ (in + keep·scale·φ(H) wᵀ) + bias, optionally storing the sum T.
#pragma once

#include "common.cuh"
#include "tc.cuh"

namespace llm_adapters {

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
  bool vec_ok;  // in, out (and t_out) 16-byte aligned and N a multiple of the vector width
  // DoRA: out = col_scale ⊙ (in + ...) + bias, the sum T = in + ... rounded into t_out when
  // it is not null. Null col_scale (the default of a brace-initialised ExpandArgs): no scale.
  const float* col_scale = nullptr;  // [N] or null
  T* t_out = nullptr;                // [M, N] like out, or null
};

// The epilogue of an expand tile, shared by both variants: thread (tx = tid % 16, ty = tid / 16)
// owns rows m0 + ty + 16 i and the 8 columns n0 + 8 tx + c; acc[i][c] · mult is its part of
// φ(H) wᵀ. Adds keep · scaling · scale · acc · mult + bias to `in` and writes `out` (16-byte
// vectors where aligned). With a column scale the sum is kept in float32, scaled, the bias
// added after the scale, and rounded once into `out` (DoRA's epilogue; T into t_out as well).
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
      if (a.col_scale == nullptr && a.bias != nullptr && n < a.N) v += a.bias[n];
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
        if (a.col_scale != nullptr) {
          if (a.t_out != nullptr) store_vec(a.t_out + row + nb + c0, base);
          LA_UNROLL
          for (int c = 0; c < V; ++c) {
            const int64_t n = nb + c0 + c;
            base[c] = base[c] * a.col_scale[n] + (a.bias != nullptr ? a.bias[n] : 0.f);
          }
        }
        store_vec(a.out + row + nb + c0, base);
      }
    } else {
      LA_UNROLL
      for (int c = 0; c < kExpandTN; ++c) {
        const int64_t n = nb + c;
        if (n >= a.N) continue;
        float sum = static_cast<float>(a.in[row + n]) + val[c];
        if (a.col_scale != nullptr) {
          if (a.t_out != nullptr) a.t_out[row + n] = static_cast<T>(sum);
          sum = sum * a.col_scale[n] + (a.bias != nullptr ? a.bias[n] : 0.f);
        }
        a.out[row + n] = static_cast<T>(sum);
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

// Launchers (kernels.cu)
template <typename T>
int launch_expand(const ExpandArgs<T>& args, Grid grid, void* stream);
// float16 / bfloat16 only; sm_80+
template <typename T>
int launch_expand_tc(const ExpandArgs<T>& args, Grid grid, void* stream);

}  // namespace llm_adapters
