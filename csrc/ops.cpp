// Schemas of the low-level kernels of llm_adapters._C (namespace torch.ops.llm_adapters_C),
// the CPU keep-mask (the same Philox code compiled for the host, so CPU-only machines can check
// it against the Triton kernels), and the Python module entry point.
//
// These ops are building blocks: llm_adapters/ops/cuda_backend.py composes them (with cuBLAS
// GEMMs through torch) into the lora / series forward and backward, and llm_adapters/ops/_custom.py
// wraps those as the public autograd-aware custom ops.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "philox.cuh"

namespace llm_adapters {
namespace {

void keep_mask_cpu(at::Tensor& out, int64_t threshold, int64_t seed) {
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kBool && out.is_contiguous(),
              "llm_adapters_C: keep_mask_: out must be a contiguous bool tensor");
  TORCH_CHECK(threshold >= 0 && threshold < 65536,
              "llm_adapters_C: dropout threshold must be in [0, 65536), got ", threshold);
  DropoutParams drop = make_dropout(threshold, seed);
  bool* data = out.data_ptr<bool>();
  const int64_t numel = out.numel();
  at::parallel_for(0, numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) data[i] = keep_element(drop, static_cast<uint64_t>(i));
  });
}

}  // namespace

TORCH_LIBRARY(llm_adapters_C, m) {
  // S = D(x) wᵀ * out_scale (+ bias): x [M, K] (f16/bf16/f32), w [r, K] f32 -> [M, r] f32
  m.def("shrink(Tensor x, Tensor w, Tensor? bias, int threshold, float out_scale, int seed) "
        "-> Tensor");
  // out = input (or out) + keep * scale * φ(h) wᵀ + bias: h [M, r] f32, w [N, r] f32
  m.def("expand_add_(Tensor(a!) out, Tensor? input, Tensor h, int act, Tensor w, Tensor? bias, "
        "Tensor? scale, float scaling, int threshold, int seed) -> ()");
  // Σ_m D(x)[m, n] φ(h[m, j]): x [M, N], h [M, r] f32 -> [N, r] f32
  m.def("reduce_rows(Tensor x, Tensor h, int act, int threshold, int seed) -> Tensor");
  // out (bool, any shape, row-major) = the keep-mask for its linear indices
  m.def("keep_mask_(Tensor(a!) out, int threshold, int seed) -> ()");
}

TORCH_LIBRARY_IMPL(llm_adapters_C, CPU, m) { m.impl("keep_mask_", &keep_mask_cpu); }

}  // namespace llm_adapters

// `import llm_adapters._C` loads this library, whose static initialisers register the ops
// above; the module itself exposes nothing.
static struct PyModuleDef llm_adapters_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of llm_adapters (torch.ops.llm_adapters_C)", -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&llm_adapters_c_module); }
