// Philox-4x32-10 keep-mask shared by every CUDA kernel of llm_adapters, compiled for host and
// device so the CPU build can be checked bit for bit against the Triton kernels.
//
// The mask is defined in llm_adapters/triton_kernels/dropout.py: for a 2-D activation [M, K]
// and a 64-bit seed,
//     i    = (row * K + col) mod 2**32
//     u    = philox4x32_10(key = (seed_lo, seed_hi), counter = (i, 0, 0, 0))[0]
//     keep = (u >> 16) >= t,     t = round(p * 65536) clipped to [0, 65535]
// which is what tl.randint(seed, i) returns for a uint32 offset i. The round function and
// its constants follow Triton's python/triton/language/random.py (philox_impl), including
// the order in which the two multiply-high results are xored into the counter.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LA_HOST_DEVICE inline
#endif

namespace llm_adapters {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

LA_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// Word 0 of Philox-4x32-10 for counter (c0, 0, 0, 0) and key (k0, k1): tl.randint(seed, c0).
LA_HOST_DEVICE uint32_t philox_word0(uint32_t c0, uint32_t k0, uint32_t k1) {
  uint32_t c1 = 0u, c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t prev_c0 = c0;
    const uint32_t prev_c2 = c2;
    c0 = mul_hi_u32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// The dropout seed and threshold as the kernels receive them.
struct DropoutParams {
  uint32_t seed_lo = 0u;
  uint32_t seed_hi = 0u;
  uint32_t threshold = 0u;  // 16-bit lane threshold t; an element is kept when lane >= t
  bool enabled = false;     // p > 0
};

inline DropoutParams make_dropout(int64_t threshold, int64_t seed) {
  DropoutParams d;
  const uint64_t s = static_cast<uint64_t>(seed);
  d.seed_lo = static_cast<uint32_t>(s & 0xFFFFFFFFull);
  d.seed_hi = static_cast<uint32_t>(s >> 32);
  d.threshold = static_cast<uint32_t>(threshold);
  d.enabled = threshold > 0;
  return d;
}

// True where the element with linear index `index` (row * width + col) is kept.
LA_HOST_DEVICE bool keep_element(const DropoutParams& d, uint64_t index) {
  const uint32_t u = philox_word0(static_cast<uint32_t>(index), d.seed_lo, d.seed_hi);
  return (u >> 16) >= d.threshold;
}

}  // namespace llm_adapters
