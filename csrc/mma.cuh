// A 16x16x16 tile multiply-accumulate with the semantics of nvcuda::wmma, written once for
// device and host.
//
// On sm_80 and newer the functions below are nvcuda::wmma calls (fragments in registers, one
// warp-wide load / mma / store each; HMMA on the tensor cores). On the host (the CPU emulation
// of ops.cpp, which runs every CUDA thread as a host thread) a fragment is a plain 16x16 array
// that every lane of the warp holds in full: loads read the same shared-memory layout with the
// same ldm and row / column-major meaning, mma multiplies the T-valued inputs and accumulates
// in float32, and a store writes the tile once (from lane 0). WMMA hides its register layout,
// so a host fragment with identical load / mma / store semantics checks all the tiling and
// indexing around it. The host also checks the preconditions the hardware would not report:
//   - the pointer of load_matrix_sync / store_matrix_sync is 256-bit (32-byte) aligned;
//   - ldm, in elements, is a multiple of 8 for 16-bit types and of 4 for float (16 bytes).
// A violation is recorded in host_error() (ops.cpp turns it into a RuntimeError after the
// emulated launch) instead of being silently accepted.
//
// Accumulation order differs (the tensor core sums a k-step internally in its own order); the
// kernels' tests compare both against float64, not against each other bit for bit.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#if !defined(__CUDA_ARCH__)
#include <atomic>
#endif

#include "philox.cuh"  // LA_HOST_DEVICE

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LA_MMA_WMMA 1
#else
#define LA_MMA_WMMA 0
#endif

namespace llm_adapters {
namespace mma {

constexpr int kTile = 16;            // m = n = k = 16
constexpr int kAlignBytes = 32;      // load / store_matrix_sync pointer alignment (256 bits)
constexpr int kLdmMultiple16 = 8;    // ldm of 16-bit tiles: a multiple of 8 elements
constexpr int kLdmMultipleF32 = 4;   // ldm of float tiles: a multiple of 4 elements

#if LA_MMA_WMMA

namespace wmma = nvcuda::wmma;

template <typename T>
struct CudaType;
template <>
struct CudaType<c10::Half> {
  using type = __half;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// A: 16x16 (m x k), row-major in memory (element (m, k) at p[m * ldm + k]); B: 16x16 (k x n),
// column-major, i.e. stored as [n][k] (rows of w: (k, n) at p[n * ldm + k]); C: the float32
// accumulator.
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, typename CudaType<T>::type,
                             wmma::row_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, typename CudaType<T>::type,
                             wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;
// The transposed layouts: A column-major (a [k][m] array: the staged rows of X for Xᵀ), B
// row-major (a [k][n] array).
template <typename T>
using FragACol = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, typename CudaType<T>::type,
                                wmma::col_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, typename CudaType<T>::type,
                                wmma::row_major>;

__device__ __forceinline__ void fill_zero(FragC& c) { wmma::fill_fragment(c, 0.f); }

template <typename T>
__device__ __forceinline__ void load_a(FragA<T>& a, const T* p, int ldm) {
  wmma::load_matrix_sync(a, reinterpret_cast<const typename CudaType<T>::type*>(p),
                         static_cast<unsigned>(ldm));
}

template <typename T>
__device__ __forceinline__ void load_b(FragB<T>& b, const T* p, int ldm) {
  wmma::load_matrix_sync(b, reinterpret_cast<const typename CudaType<T>::type*>(p),
                         static_cast<unsigned>(ldm));
}

template <typename T>
__device__ __forceinline__ void load_a_col(FragACol<T>& a, const T* p, int ldm) {
  wmma::load_matrix_sync(a, reinterpret_cast<const typename CudaType<T>::type*>(p),
                         static_cast<unsigned>(ldm));
}

template <typename T>
__device__ __forceinline__ void load_b_row(FragBRow<T>& b, const T* p, int ldm) {
  wmma::load_matrix_sync(b, reinterpret_cast<const typename CudaType<T>::type*>(p),
                         static_cast<unsigned>(ldm));
}

// (generic in the fragment types: T is not deducible through the CudaType alias)
template <typename A, typename B>
__device__ __forceinline__ void mma(FragC& c, const A& a, const B& b) {
  wmma::mma_sync(c, a, b, c);
}

// c as a row-major 16x16 float tile at p; `lane` is unused on the device (all lanes store
// their part of the fragment).
__device__ __forceinline__ void store_c(float* p, const FragC& c, int ldm, int /*lane*/) {
  wmma::store_matrix_sync(p, c, static_cast<unsigned>(ldm), wmma::mem_row_major);
}

#else  // host (and device code below sm_80, which ops.cpp never launches)

#if !defined(__CUDA_ARCH__)
// The first precondition violation seen by a host-emulated load / store (null: none).
inline std::atomic<const char*>& host_error() {
  static std::atomic<const char*> error{nullptr};
  return error;
}
#endif

LA_HOST_DEVICE bool check(bool ok, const char* what) {
#if defined(__CUDA_ARCH__)
  if (!ok) __trap();
#else
  if (!ok) {
    const char* none = nullptr;
    host_error().compare_exchange_strong(none, what);
  }
#endif
  return ok;
}

template <typename T>
LA_HOST_DEVICE bool check_tile(const void* p, int ldm) {
  constexpr int multiple = sizeof(T) == 2 ? kLdmMultiple16 : kLdmMultipleF32;
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "tiles are 16-bit or float");
  return check(reinterpret_cast<uintptr_t>(p) % kAlignBytes == 0,
               "load/store_matrix_sync pointer is not 32-byte aligned") &&
         check(ldm > 0 && ldm % multiple == 0,
               sizeof(T) == 2 ? "ldm of a 16-bit tile is not a multiple of 8 elements"
                              : "ldm of a float tile is not a multiple of 4 elements");
}

template <typename T>
struct FragA {
  float v[kTile][kTile];  // [m][k], the T values (exact in float)
};
template <typename T>
struct FragB {
  float v[kTile][kTile];  // [k][n]
};
struct FragC {
  float v[kTile][kTile];  // [m][n]
};
// the host fragments hold values, not a register layout: one type per operand serves both
template <typename T>
using FragACol = FragA<T>;
template <typename T>
using FragBRow = FragB<T>;

LA_HOST_DEVICE void fill_zero(FragC& c) {
  for (int i = 0; i < kTile; ++i) {
    for (int j = 0; j < kTile; ++j) c.v[i][j] = 0.f;
  }
}

template <typename T>
LA_HOST_DEVICE void load_a(FragA<T>& a, const T* p, int ldm) {
  if (!check_tile<T>(p, ldm)) return;
  for (int m = 0; m < kTile; ++m) {
    for (int k = 0; k < kTile; ++k) a.v[m][k] = static_cast<float>(p[m * ldm + k]);
  }
}

template <typename T>
LA_HOST_DEVICE void load_b(FragB<T>& b, const T* p, int ldm) {
  if (!check_tile<T>(p, ldm)) return;
  for (int n = 0; n < kTile; ++n) {
    for (int k = 0; k < kTile; ++k) b.v[k][n] = static_cast<float>(p[n * ldm + k]);
  }
}

// A column-major: element (m, k) at p[k * ldm + m]
template <typename T>
LA_HOST_DEVICE void load_a_col(FragA<T>& a, const T* p, int ldm) {
  if (!check_tile<T>(p, ldm)) return;
  for (int k = 0; k < kTile; ++k) {
    for (int m = 0; m < kTile; ++m) a.v[m][k] = static_cast<float>(p[k * ldm + m]);
  }
}

// B row-major: element (k, n) at p[k * ldm + n]
template <typename T>
LA_HOST_DEVICE void load_b_row(FragB<T>& b, const T* p, int ldm) {
  if (!check_tile<T>(p, ldm)) return;
  for (int k = 0; k < kTile; ++k) {
    for (int n = 0; n < kTile; ++n) b.v[k][n] = static_cast<float>(p[k * ldm + n]);
  }
}

template <typename T>
LA_HOST_DEVICE void mma(FragC& c, const FragA<T>& a, const FragB<T>& b) {
  for (int m = 0; m < kTile; ++m) {
    float row[kTile];
    for (int n = 0; n < kTile; ++n) row[n] = c.v[m][n];
    for (int k = 0; k < kTile; ++k) {
      const float av = a.v[m][k];
      for (int n = 0; n < kTile; ++n) row[n] += av * b.v[k][n];
    }
    for (int n = 0; n < kTile; ++n) c.v[m][n] = row[n];
  }
}

// Every lane holds the whole tile; lane 0 writes it (the caller synchronises before reading).
LA_HOST_DEVICE void store_c(float* p, const FragC& c, int ldm, int lane) {
  if (!check_tile<float>(p, ldm) || lane != 0) return;
  for (int m = 0; m < kTile; ++m) {
    for (int n = 0; n < kTile; ++n) p[m * ldm + n] = c.v[m][n];
  }
}

#endif

}  // namespace mma
}  // namespace llm_adapters
