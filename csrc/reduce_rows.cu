// The rank-r reduction over rows:  out[n, j] = Σ_m D(X)[m, n] · φ(H[m, j])
//     X [M, N] (x.dtype), H [M, r] float32  ->  out [N, r] float32
//
// Uses (backward): dB = s · gᵀ φ(S) (X = g, H = S, φ the branch activation) and
// dA = dSᵀ D(x) (X = x with the forward's Philox mask regenerated, H = dS, φ = identity);
// the same for the series adapter's dUp and dDn. The caller applies the scale.
//
// Memory traffic: reads X once; H is rank-sized and re-read from L2 by each column tile.
// M is split across blocks so that skinny outputs still fill the GPU; each split writes a
// float32 partial [N, r] and the partials are summed in a fixed order afterwards (no atomics,
// the result is deterministic).
#include <torch/library.h>

#include "common.cuh"

namespace llm_adapters {
namespace {

constexpr int kAcc = 8;    // output columns n per thread
constexpr int kBMR = 16;   // rows staged per step
constexpr int kMaxBN = kThreads * kAcc / 8;  // columns of the widest tile (rank tile 8)
constexpr int kMaxBR = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads) reduce_rows_kernel(
    const T* __restrict__ x, int64_t M, int64_t N, const float* __restrict__ h, int64_t R,
    int act, float* __restrict__ out, int br, int64_t rows_per_split, DropoutParams drop,
    bool vec_ok) {
  // +1 padding: with rank tile 8 a warp reads four neighbouring columns of xs at one row.
  __shared__ float xs[kBMR][kMaxBN + 1];
  __shared__ float hs[kBMR][kMaxBR];

  const int tid = threadIdx.x;
  const int groups = kThreads / br;  // column groups; thread owns columns cg, cg + groups, ...
  const int bn = groups * kAcc;
  const int j = tid % br;
  const int cg = tid / br;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * bn;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * br;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t m_end = M < m_begin + rows_per_split ? M : m_begin + rows_per_split;

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

  for (int64_t mb = m_begin; mb < m_end; mb += kBMR) {
    if (vec_ok) {
      constexpr int V = Vec<T>::kSize;
      const int per_row = bn / V;
      for (int v = tid; v < kBMR * per_row; v += kThreads) {
        const int mm = v / per_row;
        const int nn = (v % per_row) * V;
        const int64_t m = mb + mm;
        const int64_t n = n0 + nn;
        float vals[V];
        // N % V == 0 and n0 % V == 0: a vector is wholly inside or wholly outside.
        if (m < m_end && n < N) {
          load_vec(x + m * N + n, vals);
          if (drop.enabled) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
              if (!keep_element(drop, static_cast<uint64_t>(m * N + n + i))) vals[i] = 0.f;
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) vals[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < V; ++i) xs[mm][nn + i] = vals[i];
      }
    } else {
      for (int e = tid; e < kBMR * bn; e += kThreads) {
        const int mm = e / bn;
        const int nn = e % bn;
        const int64_t m = mb + mm;
        const int64_t n = n0 + nn;
        float val = 0.f;
        if (m < m_end && n < N) {
          val = static_cast<float>(x[m * N + n]);
          if (drop.enabled && !keep_element(drop, static_cast<uint64_t>(m * N + n))) val = 0.f;
        }
        xs[mm][nn] = val;
      }
    }
    for (int e = tid; e < kBMR * br; e += kThreads) {
      const int mm = e / br;
      const int jj = e % br;
      const int64_t m = mb + mm;
      const int64_t jg = j0 + jj;
      hs[mm][jj] = (m < m_end && jg < R) ? activate(h[m * R + jg], act) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int mm = 0; mm < kBMR; ++mm) {
      const float hv = hs[mm][j];
#pragma unroll
      for (int i = 0; i < kAcc; ++i) acc[i] += xs[mm][cg + groups * i] * hv;
    }
    __syncthreads();
  }

  const int64_t jg = j0 + j;
  if (jg >= R) return;
  float* part = out + static_cast<int64_t>(blockIdx.z) * N * R;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int64_t n = n0 + cg + groups * i;
    if (n < N) part[n * R + jg] = acc[i];
  }
}

at::Tensor reduce_rows_cuda(const at::Tensor& x, const at::Tensor& h, int64_t act,
                            int64_t threshold, int64_t seed) {
  check_cuda_matrix(x, "reduce_rows: x");
  check_cuda_matrix(h, "reduce_rows: h");
  check_same_device(h, x, "reduce_rows: h");
  check_activation_code(act);
  check_threshold(threshold);
  TORCH_CHECK(x.is_contiguous(), "llm_adapters_C: reduce_rows: x must be contiguous");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(0) == M,
              "llm_adapters_C: reduce_rows: h must be a contiguous float32 [", M,
              ", r] tensor, got ", h.scalar_type(), " ", h.sizes());
  const int64_t R = h.size(1);
  TORCH_CHECK(R >= 1, "llm_adapters_C: reduce_rows: the rank must be at least 1");
  const c10::cuda::CUDAGuard guard(x.device());
  if (M == 0 || N == 0) return at::zeros({N, R}, x.options().dtype(at::kFloat));

  const int br = rank_tile(R);
  const int bn = (kThreads / br) * kAcc;
  const int64_t gx = ceil_div(N, bn), gy = ceil_div(R, br);
  const int64_t m_tiles = ceil_div(M, kBMR);
  int64_t splits = 1;
  if (gx * gy < 2 * sm_count()) {
    splits = std::min<int64_t>(m_tiles, ceil_div(2 * sm_count(), gx * gy));
  }
  const int64_t rows_per_split = ceil_div(m_tiles, splits) * kBMR;
  splits = ceil_div(M, rows_per_split);
  TORCH_CHECK(gy <= 65535 && splits <= 65535, "llm_adapters_C: reduce_rows: shape too large");
  at::Tensor part = at::empty({splits, N, R}, x.options().dtype(at::kFloat));
  const DropoutParams drop = make_dropout(threshold, seed);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                  static_cast<unsigned>(splits));
  auto stream = c10::cuda::getCurrentCUDAStream();
  LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "reduce_rows", [&] {
    const bool vec_ok = vec_aligned<scalar_t>(x.data_ptr(), N);
    reduce_rows_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), M, N, h.data_ptr<float>(), R, static_cast<int>(act),
        part.data_ptr<float>(), br, rows_per_split, drop, vec_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return splits == 1 ? part.select(0, 0) : part.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) { m.impl("reduce_rows", &reduce_rows_cuda); }

}  // namespace llm_adapters
