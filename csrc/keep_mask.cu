// The dropout keep-mask as a tensor, for tests and for `ops.dropout_mask`: exactly the bits
// the shrink, expand and reduce kernels regenerate (see philox.cuh).
#include <torch/library.h>

#include "common.cuh"

namespace llm_adapters {
namespace {

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t numel, DropoutParams drop) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) out[i] = keep_element(drop, static_cast<uint64_t>(i));
}

void keep_mask_cuda(at::Tensor& out, int64_t threshold, int64_t seed) {
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kBool && out.is_contiguous(),
              "llm_adapters_C: keep_mask_: out must be a contiguous bool CUDA tensor");
  check_threshold(threshold);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  DropoutParams drop = make_dropout(threshold, seed);
  drop.enabled = true;
  const int64_t blocks = ceil_div(numel, kThreads);
  keep_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0,
                     c10::cuda::getCurrentCUDAStream()>>>(out.data_ptr<bool>(), numel, drop);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) { m.impl("keep_mask_", &keep_mask_cuda); }

}  // namespace llm_adapters
