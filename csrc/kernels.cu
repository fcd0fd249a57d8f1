// The __global__ entry points of the kernels (shrink.cuh, expand.cuh, reduce_rows.cuh,
// row_block.cuh) and their launchers.
//
// This file includes no ATen or torch header (only CUDA and c10's Half / BFloat16), so nvcc
// compiles it in seconds; the tensor checks, allocation and dispatch live in ops.cpp.
#include <cuda_runtime.h>

#include "common.cuh"
#include "expand.cuh"
#include "reduce_rows.cuh"
#include "row_block.cuh"
#include "shrink.cuh"
#include "tc.cuh"

namespace llm_adapters {
namespace {

struct DeviceSync {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};

__device__ __forceinline__ BlockIdx block_index() {
  return BlockIdx{static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(blockIdx.y),
                  static_cast<int64_t>(blockIdx.z)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_kernel(const ShrinkArgs<T> args) {
  __shared__ __align__(16) float smem[kShrinkSmemFloats];
  DeviceSync sync;
  shrink_block(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
}

// The tile MMAs need sm_80 (bfloat16 WMMA); below it the body is empty and ops.cpp never
// launches it. 32-byte alignment: the WMMA tile pointers are offsets of 32-byte multiples.
// Two blocks per SM (<= 128 registers: twice the loads of x in flight) where that costs no
// spills on sm_80 / sm_90 (ptxas -v): NT = 1, r <= 16. Wider rank tiles hold 2x / 4x the
// accumulators and run one block per SM.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 2 : 1)
    shrink_tc_kernel(const ShrinkArgs<T> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) float smem[kTcSmemFloats];
  DeviceSync sync;
  shrink_tc_block<NT>(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandArgs<T> args) {
  __shared__ __align__(16) float smem[kExpandSmemFloats];
  DeviceSync sync;
  expand_block(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
}

// As shrink_tc_kernel: empty below sm_80. Two blocks per SM (<= 128 registers, no spills on
// sm_80 / sm_90): the epilogue's reads of `in` and writes of `out` are the kernel's traffic.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) expand_tc_kernel(const ExpandArgs<T> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) float smem[kEtSmemFloats];
  DeviceSync sync;
  expand_tc_block(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
#endif
}

// As shrink_tc_kernel: empty below sm_80; two blocks per SM at NT = 1.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 2 : 1)
    reduce_rows_tc_kernel(const ReduceArgs<T> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) float smem[kRtSmemFloats];
  DeviceSync sync;
  reduce_rows_tc_block<NT>(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
#endif
}

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_rows_kernel(const ReduceArgs<T> args) {
  __shared__ __align__(16) float smem[kReduceSmemFloats];
  DeviceSync sync;
  reduce_rows_block(args, block_index(), static_cast<int>(threadIdx.x), smem, sync);
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) series_fwd_kernel(const SeriesFwdArgs<T> args) {
  __shared__ __align__(16) float smem[row_fused_smem_floats<RT>()];
  DeviceSync sync;
  series_fwd_block<RT>(args, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), smem,
                   sync);
}

// As shrink_tc_kernel: empty below sm_80. The tile buffer of grad_rows_tc_kernel.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 2 : 1)
    series_fwd_tc_kernel(const SeriesFwdArgs<T> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) float smem[kGtSmemFloats];
  DeviceSync sync;
  series_fwd_tc_block<NT>(args, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x),
                          smem, sync);
#endif
}

template <typename T, int RT>
__global__ void __launch_bounds__(kThreads) grad_rows_kernel(const GradRowsArgs<T> args) {
  __shared__ __align__(16) float smem[row_fused_smem_floats<RT>()];
  DeviceSync sync;
  grad_rows_block<RT>(args, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x), smem,
                  sync);
}

// As shrink_tc_kernel: empty below sm_80.
template <typename T, int NT>
__global__ void __launch_bounds__(kThreads, NT == 1 ? 2 : 1)
    grad_rows_tc_kernel(const GradRowsArgs<T> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(32) float smem[kGtSmemFloats];
  DeviceSync sync;
  grad_rows_tc_block<NT>(args, static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x),
                         smem, sync);
#endif
}

__global__ void sum_partials_kernel(float* __restrict__ out, const float* __restrict__ part,
                                    int64_t splits, int64_t count, const float* scale_ptr,
                                    float scaling) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) sum_partials_at(out, part, splits, count, i, scale_ptr, scaling);
}

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t numel, DropoutParams drop) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) out[i] = keep_element(drop, static_cast<uint64_t>(i));
}

dim3 to_dim3(Grid g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

}  // namespace

template <typename T>
int launch_shrink(const ShrinkArgs<T>& args, Grid grid, void* stream) {
  shrink_kernel<T><<<to_dim3(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_shrink_tc(const ShrinkArgs<T>& args, Grid grid, int nt, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  with_rank_tiles(nt, [&](auto tiles) {
    shrink_tc_kernel<T, decltype(tiles)::value><<<to_dim3(grid), kThreads, 0, s>>>(args);
  });
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_expand(const ExpandArgs<T>& args, Grid grid, void* stream) {
  expand_kernel<T><<<to_dim3(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_expand_tc(const ExpandArgs<T>& args, Grid grid, void* stream) {
  expand_tc_kernel<T><<<to_dim3(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_reduce_rows(const ReduceArgs<T>& args, Grid grid, void* stream) {
  reduce_rows_kernel<T><<<to_dim3(grid), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(args);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_reduce_rows_tc(const ReduceArgs<T>& args, Grid grid, int nt, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  with_rank_tiles(nt, [&](auto tiles) {
    reduce_rows_tc_kernel<T, decltype(tiles)::value><<<to_dim3(grid), kThreads, 0, s>>>(args);
  });
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_series_fwd(const SeriesFwdArgs<T>& args, int64_t blocks, bool wide, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (wide) {
    series_fwd_kernel<T, kRowWideRT><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(args);
  } else {
    series_fwd_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_series_fwd_tc(const SeriesFwdArgs<T>& args, int64_t blocks, int nt, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(blocks);
  with_rank_tiles(nt, [&](auto tiles) {
    series_fwd_tc_kernel<T, decltype(tiles)::value><<<grid, kThreads, 0, s>>>(args);
  });
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_grad_rows(const GradRowsArgs<T>& args, int64_t blocks, bool wide, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (wide) {
    grad_rows_kernel<T, kRowWideRT><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(args);
  } else {
    grad_rows_kernel<T, 1><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(args);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_grad_rows_tc(const GradRowsArgs<T>& args, int64_t blocks, int nt, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(blocks);
  with_rank_tiles(nt, [&](auto tiles) {
    grad_rows_tc_kernel<T, decltype(tiles)::value><<<grid, kThreads, 0, s>>>(args);
  });
  return static_cast<int>(cudaGetLastError());
}

int launch_sum_partials(float* out, const float* part, int64_t splits, int64_t count,
                        const float* scale_ptr, float scaling, void* stream) {
  const int64_t blocks = (count + kThreads - 1) / kThreads;
  sum_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                        static_cast<cudaStream_t>(stream)>>>(out, part, splits, count, scale_ptr,
                                                             scaling);
  return static_cast<int>(cudaGetLastError());
}

int launch_keep_mask(bool* out, int64_t numel, DropoutParams drop, void* stream) {
  const int64_t blocks = (numel + kThreads - 1) / kThreads;
  keep_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                     static_cast<cudaStream_t>(stream)>>>(out, numel, drop);
  return static_cast<int>(cudaGetLastError());
}

#define LA_INSTANTIATE(T)                                                   \
  template int launch_shrink<T>(const ShrinkArgs<T>&, Grid, void*);         \
  template int launch_expand<T>(const ExpandArgs<T>&, Grid, void*);         \
  template int launch_reduce_rows<T>(const ReduceArgs<T>&, Grid, void*);     \
  template int launch_series_fwd<T>(const SeriesFwdArgs<T>&, int64_t, bool, void*); \
  template int launch_grad_rows<T>(const GradRowsArgs<T>&, int64_t, bool, void*);

LA_INSTANTIATE(float)
LA_INSTANTIATE(c10::Half)
LA_INSTANTIATE(c10::BFloat16)
template int launch_shrink_tc<c10::Half>(const ShrinkArgs<c10::Half>&, Grid, int, void*);
template int launch_shrink_tc<c10::BFloat16>(const ShrinkArgs<c10::BFloat16>&, Grid, int, void*);
template int launch_reduce_rows_tc<c10::Half>(const ReduceArgs<c10::Half>&, Grid, int, void*);
template int launch_reduce_rows_tc<c10::BFloat16>(const ReduceArgs<c10::BFloat16>&, Grid, int,
                                                  void*);
template int launch_expand_tc<c10::Half>(const ExpandArgs<c10::Half>&, Grid, void*);
template int launch_expand_tc<c10::BFloat16>(const ExpandArgs<c10::BFloat16>&, Grid, void*);
template int launch_series_fwd_tc<c10::Half>(const SeriesFwdArgs<c10::Half>&, int64_t, int,
                                             void*);
template int launch_series_fwd_tc<c10::BFloat16>(const SeriesFwdArgs<c10::BFloat16>&, int64_t,
                                                 int, void*);
template int launch_grad_rows_tc<c10::Half>(const GradRowsArgs<c10::Half>&, int64_t, int, void*);
template int launch_grad_rows_tc<c10::BFloat16>(const GradRowsArgs<c10::BFloat16>&, int64_t, int,
                                                void*);

}  // namespace llm_adapters
