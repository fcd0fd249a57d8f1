// What every adapter kernel shares: the block-function convention, the 16-byte vector
// access, the branch non-linearities φ / φ' with their codes, and the Philox keep-mask.
//
// Each kernel is a block function `*_block(args, block, tid, smem, sync)`: kernels.cu wraps it
// in a __global__ function (shared memory, threadIdx, __syncthreads), and emulate() in ops.cpp
// runs the very same function on CPU threads with a barrier, so CPU-only machines check the tiling,
// bounds and dropout indexing of the code that runs on the GPU. Only c10's Half / BFloat16
// headers are included: no ATen, which keeps the nvcc compile short.
//
// The kernel families (shrink.cuh, expand.cuh, reduce_rows.cuh and row_block.cuh for
// series_fwd and grad_rows; each *_tc_block runs the tile MMAs of mma.cuh through the
// helpers of tc.cuh):
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

// Launchers (kernels.cu, declared next to their kernels): grid as (x, y, z) block counts;
// they return the launch's cudaError_t as int.
struct Grid {
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

// 8 consecutive floats of a 16-byte aligned p (two 128-bit loads on the device).
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

// ----------------------------------------------------------------------------------------------
// Branch non-linearities φ (codes: llm_adapters._numerics.ACTIVATION_CODES, checked by
// tests/test_cuda_codes.py)
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

// φ'(s), with the formulas of llm_adapters/_numerics.py
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

int launch_keep_mask(bool* out, int64_t numel, DropoutParams drop, void* stream);

}  // namespace llm_adapters
