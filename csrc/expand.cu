// The rank-r expand, written into an [M, N] output:
//     out[m, n] = in[m, n] + keep(m, n) * scale * Σ_j φ(H[m, j]) w[n, j] + bias[n]
// with H [M, r] float32, w [N, r] (any strides, float32), scale = scaling * (*scale_ptr).
//
// Uses: the LoRA / parallel-adapter epilogue y += s·φ(S)Bᵀ into the cuBLAS base output in
// place (in == out); the series adapter z = h + s·φ(S)Upᵀ + u_b; and in backward the masked
// D'(dS·A) added to dx = g·W from cuBLAS (keep = the forward's Philox mask, scale = 1/keep).
//
// Memory traffic: reads `in` and writes `out` once each ([M, N]); H and w are rank-sized and
// re-read from L2 by every tile. The rank-r product is accumulated in float32 registers and
// the result is rounded once, when it is added to `in`.
#include <torch/library.h>

#include "common.cuh"

namespace llm_adapters {
namespace {

constexpr int kBM = 64;   // rows per block: 16 row groups x 4 rows per thread
constexpr int kBN = 128;  // columns per block: 16 column groups x 8 contiguous columns
constexpr int kRK = 16;   // rank columns staged per step
constexpr int kTM = 4;
constexpr int kTN = 8;

// out and in may be the same tensor (y += ...), so neither is __restrict__.
template <typename T>
__global__ void __launch_bounds__(kThreads) expand_kernel(
    T* out, const T* in, int64_t M, int64_t N, const float* __restrict__ h,
    int64_t R, int act, const float* __restrict__ w, int64_t w_sn, int64_t w_sr,
    const float* __restrict__ bias, const float* __restrict__ scale_ptr, float scaling,
    DropoutParams drop, bool vec_ok) {
  // hs is transposed ([rank][row]) and padded so the staging stores do not collide in a bank;
  // ws rows stay 16-byte aligned (132 floats) for the float4 reads of the inner loop.
  __shared__ float hs[kRK][kBM + 1];
  __shared__ __align__(16) float ws[kRK][kBN + 4];

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  float acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int c = 0; c < kTN; ++c) acc[i][c] = 0.f;
  }

  for (int64_t j0 = 0; j0 < R; j0 += kRK) {
    for (int e = tid; e < kBM * kRK; e += kThreads) {
      const int mm = e / kRK;
      const int jj = e % kRK;
      const int64_t m = m0 + mm;
      const int64_t j = j0 + jj;
      hs[jj][mm] = (m < M && j < R) ? activate(h[m * R + j], act) : 0.f;
    }
    for (int e = tid; e < kBN * kRK; e += kThreads) {
      const int nn = e / kRK;
      const int jj = e % kRK;
      const int64_t n = n0 + nn;
      const int64_t j = j0 + jj;
      ws[jj][nn] = (n < N && j < R) ? w[n * w_sn + j * w_sr] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int jj = 0; jj < kRK; ++jj) {
      float hv[kTM];
#pragma unroll
      for (int i = 0; i < kTM; ++i) hv[i] = hs[jj][ty + 16 * i];
      const float4 w0 = *reinterpret_cast<const float4*>(&ws[jj][tx * kTN]);
      const float4 w1 = *reinterpret_cast<const float4*>(&ws[jj][tx * kTN + 4]);
      const float wv[kTN] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int c = 0; c < kTN; ++c) acc[i][c] += hv[i] * wv[c];
      }
    }
    __syncthreads();
  }

  const float scale = scale_ptr == nullptr ? scaling : scaling * scale_ptr[0];
  const int64_t nb = n0 + tx * kTN;
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
    float val[kTN];
#pragma unroll
    for (int c = 0; c < kTN; ++c) {
      const int64_t n = nb + c;
      float v = acc[i][c] * scale;
      if (drop.enabled && n < N && !keep_element(drop, static_cast<uint64_t>(m * N + n))) {
        v = 0.f;
      }
      if (bias != nullptr && n < N) v += bias[n];
      val[c] = v;
    }
    const int64_t row = m * N;
    if (vec_ok && nb + kTN <= N) {
      constexpr int V = Vec<T>::kSize;
#pragma unroll
      for (int c0 = 0; c0 < kTN; c0 += V) {
        float base[V];
        load_vec(in + row + nb + c0, base);
#pragma unroll
        for (int c = 0; c < V; ++c) base[c] += val[c0 + c];
        store_vec(out + row + nb + c0, base);
      }
    } else {
#pragma unroll
      for (int c = 0; c < kTN; ++c) {
        const int64_t n = nb + c;
        if (n < N) out[row + n] = static_cast<T>(static_cast<float>(in[row + n]) + val[c]);
      }
    }
  }
}

void expand_add_cuda(at::Tensor& out, const c10::optional<at::Tensor>& input, const at::Tensor& h,
                     int64_t act, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& scale, double scaling, int64_t threshold,
                     int64_t seed) {
  check_cuda_matrix(out, "expand_add_: out");
  check_cuda_matrix(h, "expand_add_: h");
  check_cuda_matrix(w, "expand_add_: w");
  check_same_device(h, out, "expand_add_: h");
  check_same_device(w, out, "expand_add_: w");
  check_activation_code(act);
  check_threshold(threshold);
  TORCH_CHECK(out.is_contiguous(), "llm_adapters_C: expand_add_: out must be contiguous");
  const int64_t M = out.size(0), N = out.size(1);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(0) == M,
              "llm_adapters_C: expand_add_: h must be a contiguous float32 [", M,
              ", r] tensor, got ", h.scalar_type(), " ", h.sizes());
  const int64_t R = h.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.size(0) == N && w.size(1) == R,
              "llm_adapters_C: expand_add_: w must be float32 of shape [", N, ", ", R, "], got ",
              w.scalar_type(), " ", w.sizes());
  const at::Tensor& in = input.has_value() ? input.value() : out;
  if (input.has_value()) {
    check_same_device(in, out, "expand_add_: input");
    TORCH_CHECK(in.scalar_type() == out.scalar_type() && in.sizes() == out.sizes() &&
                    in.is_contiguous(),
                "llm_adapters_C: expand_add_: input must be contiguous with out's dtype ",
                out.scalar_type(), " and shape ", out.sizes(), ", got ", in.scalar_type(), " ",
                in.sizes());
  }
  if (bias.has_value()) {
    const at::Tensor& b = bias.value();
    check_same_device(b, out, "expand_add_: bias");
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 1 && b.size(0) == N &&
                    b.is_contiguous(),
                "llm_adapters_C: expand_add_: bias must be contiguous float32 [", N, "], got ",
                b.scalar_type(), " ", b.sizes());
  }
  if (scale.has_value()) {
    const at::Tensor& s = scale.value();
    check_same_device(s, out, "expand_add_: scale");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1,
                "llm_adapters_C: expand_add_: scale must be a one-element float32 tensor, got ",
                s.scalar_type(), " ", s.sizes());
  }
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  if (R == 0) {  // nothing to add but the bias: keep the out = in + bias contract
    if (input.has_value()) out.copy_(in);
    if (bias.has_value()) out.add_(bias.value());
    return;
  }
  TORCH_CHECK(ceil_div(N, kBN) <= 65535, "llm_adapters_C: expand_add_: too many columns (", N,
              ")");
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kBM)), static_cast<unsigned>(ceil_div(N, kBN)));
  const DropoutParams drop = make_dropout(threshold, seed);
  const float* bias_ptr = bias.has_value() ? bias.value().data_ptr<float>() : nullptr;
  const float* scale_ptr = scale.has_value() ? scale.value().data_ptr<float>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  LA_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "expand_add_", [&] {
    const bool vec_ok = vec_aligned<scalar_t>(out.data_ptr(), N) && vec_aligned<scalar_t>(in.data_ptr(), N);
    expand_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), M, N, h.data_ptr<float>(), R,
        static_cast<int>(act), w.data_ptr<float>(), w.stride(0), w.stride(1), bias_ptr,
        scale_ptr, static_cast<float>(scaling), drop, vec_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) { m.impl("expand_add_", &expand_add_cuda); }

}  // namespace llm_adapters
