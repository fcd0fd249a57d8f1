// The rank-r shrink:  S = D(x) wᵀ * out_scale (+ bias)       x [M, K], w [r, K] -> S [M, r]
//
// Used for the LoRA / parallel-adapter shrink S = D(x) Aᵀ + a_b (dropout fused: the keep-mask
// is regenerated from the Philox seed while x is staged in shared memory, never stored), the
// series-adapter shrink S = D(h) Dnᵀ + d_b, and in backward for g·B (no dropout).
//
// Memory traffic: reads x once ([M, K]) and writes S ([M, r], float32). The rank side w is
// small and stays in L2. When the row tiles alone cannot fill the GPU (small M or large tiles),
// K is split across blocks; each split writes its own float32 partial and the partials are
// summed in a fixed order afterwards, so the result is deterministic.
#include <torch/library.h>

#include "common.cuh"

namespace llm_adapters {
namespace {

constexpr int kAcc = 8;   // output rows per thread
constexpr int kBK = 32;   // K columns staged per step
constexpr int kMaxBM = kThreads * kAcc / 8;  // rows of the tallest tile (rank tile 8)
constexpr int kMaxBR = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) shrink_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, const float* __restrict__ w, int64_t w_sr,
    int64_t w_sk, int64_t R, float* __restrict__ out, int br, int64_t k_per_split,
    DropoutParams drop, float out_scale, bool vec_ok) {
  // +1 column of padding: threads of a warp read different rows of ws at one k.
  __shared__ float xs[kMaxBM * (kBK + 1)];
  __shared__ float ws[kMaxBR * (kBK + 1)];

  const int tid = threadIdx.x;
  const int groups = kThreads / br;  // row groups; thread owns rows rg, rg + groups, ...
  const int bm = groups * kAcc;
  const int j = tid % br;
  const int rg = tid / br;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * bm;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * br;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t k_end = K < k_begin + k_per_split ? K : k_begin + k_per_split;

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    if (vec_ok) {
      constexpr int V = Vec<T>::kSize;
      constexpr int per_row = kBK / V;
      for (int v = tid; v < bm * per_row; v += kThreads) {
        const int mm = v / per_row;
        const int kk = (v % per_row) * V;
        const int64_t m = m0 + mm;
        const int64_t k = k0 + kk;
        float vals[V];
        // K % V == 0 and k0 % V == 0, so a vector is either wholly inside or wholly outside.
        if (m < M && k < k_end) {
          load_vec(x + m * K + k, vals);
          if (drop.enabled) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              if (!keep_element(drop, static_cast<uint64_t>(m * K + k + i))) vals[i] = 0.f;
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) vals[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < V; ++i) xs[mm * (kBK + 1) + kk + i] = vals[i];
      }
    } else {
      for (int e = tid; e < bm * kBK; e += kThreads) {
        const int mm = e / kBK;
        const int kk = e % kBK;
        const int64_t m = m0 + mm;
        const int64_t k = k0 + kk;
        float val = 0.f;
        if (m < M && k < k_end) {
          val = static_cast<float>(x[m * K + k]);
          if (drop.enabled && !keep_element(drop, static_cast<uint64_t>(m * K + k))) val = 0.f;
        }
        xs[mm * (kBK + 1) + kk] = val;
      }
    }
    for (int e = tid; e < br * kBK; e += kThreads) {
      const int jj = e / kBK;
      const int kk = e % kBK;
      const int64_t jg = j0 + jj;
      const int64_t k = k0 + kk;
      ws[jj * (kBK + 1) + kk] = (jg < R && k < k_end) ? w[jg * w_sr + k * w_sk] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kBK; ++kk) {
      const float wv = ws[j * (kBK + 1) + kk];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[i] += xs[(rg + groups * i) * (kBK + 1) + kk] * wv;
    }
    __syncthreads();
  }

  const int64_t jg = j0 + j;
  if (jg >= R) return;
  float* part = out + static_cast<int64_t>(blockIdx.z) * M * R;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int64_t m = m0 + rg + groups * i;
    if (m < M) part[m * R + jg] = acc[i] * out_scale;
  }
}

at::Tensor shrink_cuda(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       int64_t threshold, double out_scale, int64_t seed) {
  check_cuda_matrix(x, "shrink: x");
  check_cuda_matrix(w, "shrink: w");
  check_same_device(w, x, "shrink: w");
  TORCH_CHECK(x.is_contiguous(), "llm_adapters_C: shrink: x must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "llm_adapters_C: shrink: w must be float32, got ",
              w.scalar_type());
  TORCH_CHECK(w.size(1) == x.size(1), "llm_adapters_C: shrink: w has shape ", w.sizes(),
              " but x has ", x.size(1), " columns");
  TORCH_CHECK(w.size(0) >= 1, "llm_adapters_C: shrink: the rank must be at least 1");
  check_threshold(threshold);
  const int64_t M = x.size(0), K = x.size(1), R = w.size(0);
  if (bias.has_value()) {
    const at::Tensor& b = bias.value();
    check_same_device(b, x, "shrink: bias");
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == R,
                "llm_adapters_C: shrink: bias must be float32 of shape [", R, "], got ",
                b.scalar_type(), " ", b.sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor result;
  if (M == 0 || K == 0) {
    result = at::zeros({M, R}, x.options().dtype(at::kFloat));
  } else {
    const int br = rank_tile(R);
    const int bm = (kThreads / br) * kAcc;
    const int64_t gx = ceil_div(M, bm), gy = ceil_div(R, br);
    const int64_t k_tiles = ceil_div(K, kBK);
    int64_t splits = 1;
    if (gx * gy < 2 * sm_count()) {
      splits = std::min<int64_t>(k_tiles, ceil_div(2 * sm_count(), gx * gy));
    }
    const int64_t k_per_split = ceil_div(k_tiles, splits) * kBK;
    splits = ceil_div(K, k_per_split);
    at::Tensor part = at::empty({splits, M, R}, x.options().dtype(at::kFloat));
    const DropoutParams drop = make_dropout(threshold, seed);
    const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                    static_cast<unsigned>(splits));
    auto stream = c10::cuda::getCurrentCUDAStream();
    LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "shrink", [&] {
      const bool vec_ok = vec_aligned<scalar_t>(x.data_ptr(), K);
      shrink_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), M, K, w.data_ptr<float>(), w.stride(0), w.stride(1), R,
          part.data_ptr<float>(), br, k_per_split, drop, static_cast<float>(out_scale), vec_ok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    result = splits == 1 ? part.select(0, 0) : part.sum(0);
  }
  if (bias.has_value()) result.add_(bias.value());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) { m.impl("shrink", &shrink_cuda); }

}  // namespace llm_adapters
