// Helpers shared by the adapter kernels: dtype dispatch, 16-byte vector loads and stores,
// the branch non-linearities and the input checks.
#pragma once

// Only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS and cuSPARSE headers, which a
// bare nvcc install (the CI build machine) does not have.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.cuh"

namespace llm_adapters {

constexpr int kThreads = 256;

// The activations' dtypes the kernels are built for; float64 stays on the torch backend.
#define LA_DISPATCH_FLOAT_HALF_BF16(dtype, name, ...)                                   \
  switch (dtype) {                                                                    \
    case at::kFloat: {                                                                \
      using scalar_t = float;                                                         \
      __VA_ARGS__();                                                                  \
      break;                                                                          \
    }                                                                                 \
    case at::kHalf: {                                                                 \
      using scalar_t = at::Half;                                                      \
      __VA_ARGS__();                                                                  \
      break;                                                                          \
    }                                                                                 \
    case at::kBFloat16: {                                                             \
      using scalar_t = at::BFloat16;                                                  \
      __VA_ARGS__();                                                                  \
      break;                                                                          \
    }                                                                                 \
    default:                                                                          \
      TORCH_CHECK(false, name, ": unsupported dtype ", dtype,                         \
                  " (the CUDA kernels take float16, bfloat16 or float32)");           \
  }

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* out) {
  constexpr int V = Vec<T>::kSize;
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float* v) {
  constexpr int V = Vec<T>::kSize;
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < V; ++i) e[i] = static_cast<T>(v[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// A pointer and row stride allow 16-byte vector access along a row.
template <typename T>
inline bool vec_aligned(const void* p, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride % Vec<T>::kSize == 0;
}

// Branch non-linearities, codes as in llm_adapters/ops/cuda_backend.py.
enum Activation : int { kIdentity = 0, kTanh = 1, kRelu = 2, kGelu = 3, kSilu = 4 };

__device__ __forceinline__ float activate(float s, int act) {
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

inline void check_activation_code(int64_t act) {
  TORCH_CHECK(act >= kIdentity && act <= kSilu, "llm_adapters_C: unknown activation code ",
              act, " (expected 0..4: identity, tanh, relu, gelu, silu)");
}

inline void check_cuda_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "llm_adapters_C: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "llm_adapters_C: ", name, " must be 2-D, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "llm_adapters_C: ", name, " is on ", t.device(),
              " but the activations are on ", ref.device());
}

inline void check_threshold(int64_t threshold) {
  TORCH_CHECK(threshold >= 0 && threshold < 65536,
              "llm_adapters_C: dropout threshold must be in [0, 65536), got ", threshold);
}

// Streaming multiprocessors of the current device (the launchers size their grids to it).
inline int sm_count() {
  int device = 0;
  int count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rank columns handled by one block: the smallest power of two >= r in [8, 64]. With 8
// accumulators per thread a block covers 2048 / width rows, so small ranks get tall tiles.
inline int rank_tile(int64_t r) {
  int width = 8;
  while (width < r && width < 64) width *= 2;
  return width;
}

}  // namespace llm_adapters
