// The low-level ops of llm_adapters._C (namespace torch.ops.llm_adapters_C): schemas, input
// checks, grid sizing and dispatch to the kernels of kernels.cuh, and the Python module entry.
//
// These ops are building blocks: llm_adapters/ops/cuda_backend.py composes them with the base
// GEMMs (cuBLAS through torch) into the lora / series forward and backward, and
// llm_adapters/ops/_custom.py wraps those as the public autograd-aware custom ops.
//
// CUDA tensors run the kernels. CPU tensors run the same kernel code on host threads (one per
// CUDA thread, a barrier for __syncthreads, see emulate()): far too slow for use, but it lets a
// machine without a GPU check the kernels' indexing, bounds, split reductions and dropout.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "kernels.cuh"

namespace llm_adapters {
namespace {

// ----------------------------------------------------------------------------------------------
// Where a launch runs: a CUDA stream, or host threads
// ----------------------------------------------------------------------------------------------

// The SM count the host emulation pretends to have: small, so that the split reductions (used
// on a GPU when row tiles alone cannot fill it) are exercised by small test shapes.
constexpr int kEmulatedSms = 2;

struct Exec {
  bool cuda;
  void* stream;
  int sms;
};

Exec exec_for(const at::Tensor& t) {
  if (!t.is_cuda()) return Exec{false, nullptr, kEmulatedSms};
  const int device = t.device().index();
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return Exec{true, c10::cuda::getCurrentCUDAStream(device).stream(), std::max(count, 1)};
}

class HostBarrier {
 public:
  explicit HostBarrier(int parties) : parties_(parties) {}
  void operator()() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == parties_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int parties_;
  int waiting_ = 0;
  int64_t generation_ = 0;
};

// Runs block function `body(block, tid, smem, sync)` for every block of `grid`, one block at a
// time, with kThreads host threads per block.
template <typename Body>
void emulate(Grid grid, int smem_floats, const Body& body) {
  std::vector<float> smem(static_cast<size_t>(smem_floats));
  for (int64_t z = 0; z < grid.z; ++z) {
    for (int64_t y = 0; y < grid.y; ++y) {
      for (int64_t x = 0; x < grid.x; ++x) {
        HostBarrier barrier(kThreads);
        std::vector<std::thread> threads;
        threads.reserve(kThreads);
        for (int tid = 0; tid < kThreads; ++tid) {
          threads.emplace_back([&, tid] { body(BlockIdx{x, y, z}, tid, smem.data(), barrier); });
        }
        for (auto& t : threads) t.join();
      }
    }
  }
}

void check_launch(int err) {
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

// ----------------------------------------------------------------------------------------------
// Checks and dispatch helpers
// ----------------------------------------------------------------------------------------------

#define LA_DISPATCH_FLOAT_HALF_BF16(dtype, name, ...)                                       \
  switch (dtype) {                                                                        \
    case at::kFloat: {                                                                    \
      using scalar_t = float;                                                             \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    case at::kHalf: {                                                                     \
      using scalar_t = c10::Half;                                                         \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    case at::kBFloat16: {                                                                 \
      using scalar_t = c10::BFloat16;                                                     \
      __VA_ARGS__();                                                                      \
      break;                                                                              \
    }                                                                                     \
    default:                                                                              \
      TORCH_CHECK(false, "llm_adapters_C: ", name, ": unsupported dtype ", dtype,         \
                  " (the kernels take float16, bfloat16 or float32)");                    \
  }

void check_matrix(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "llm_adapters_C: ", name, " must be 2-D, got shape ", t.sizes());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "llm_adapters_C: ", name, " is on ", t.device(),
              " but the activations are on ", ref.device());
}

void check_threshold(int64_t threshold) {
  TORCH_CHECK(threshold >= 0 && threshold < 65536,
              "llm_adapters_C: dropout threshold must be in [0, 65536), got ", threshold);
}

void check_activation(int64_t act) {
  TORCH_CHECK(act >= kIdentity && act <= kSilu, "llm_adapters_C: unknown activation code ",
              act, " (expected 0..4: identity, tanh, relu, gelu, silu)");
}

void check_f32_vector(const c10::optional<at::Tensor>& t, int64_t n, const at::Tensor& ref,
                      const char* name) {
  if (!t.has_value()) return;
  const at::Tensor& v = t.value();
  check_same_device(v, ref, name);
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == n &&
                  v.is_contiguous(),
              "llm_adapters_C: ", name, " must be a contiguous float32 [", n, "] tensor, got ",
              v.scalar_type(), " ", v.sizes());
}

template <typename T>
bool vec_aligned(const void* p, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_stride % Vec<T>::kSize == 0;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rank columns per block: the smallest power of two >= r in [8, 64]; the block's rows (shrink)
// or columns (reduce_rows) follow from it through shrink_layout.
int rank_tile(int64_t r) {
  int width = 8;
  while (width < r && width < 64) width *= 2;
  return width;
}

// Splits of a reduction of `tiles` steps so that blocks * splits fills about two waves.
int64_t split_count(int64_t blocks, int64_t tiles, int sms) {
  if (blocks >= 2 * sms) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(tiles, ceil_div(2 * sms, blocks)));
}

// The device to make current for a launch: the tensor's, when it is a CUDA tensor.
c10::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  if (t.is_cuda()) return t.device();
  return c10::nullopt;
}

// ----------------------------------------------------------------------------------------------
// shrink
// ----------------------------------------------------------------------------------------------

at::Tensor shrink(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  int64_t threshold, double out_scale, int64_t seed) {
  check_matrix(x, "shrink: x");
  check_matrix(w, "shrink: w");
  check_same_device(w, x, "shrink: w");
  TORCH_CHECK(x.is_contiguous(), "llm_adapters_C: shrink: x must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat, "llm_adapters_C: shrink: w must be float32, got ",
              w.scalar_type());
  TORCH_CHECK(w.size(1) == x.size(1), "llm_adapters_C: shrink: w has shape ", w.sizes(),
              " but x has ", x.size(1), " columns");
  TORCH_CHECK(w.size(0) >= 1, "llm_adapters_C: shrink: the rank must be at least 1");
  check_threshold(threshold);
  const int64_t M = x.size(0), K = x.size(1), R = w.size(0);
  check_f32_vector(bias, R, x, "shrink: bias");
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(x));
  at::Tensor result;
  if (M == 0 || K == 0) {
    result = at::zeros({M, R}, x.options().dtype(at::kFloat));
  } else {
    const Exec exec = exec_for(x);
    const int br = rank_tile(R);
    const int64_t gx = ceil_div(M, shrink_layout(br).bm), gy = ceil_div(R, br);
    const int64_t k_tiles = ceil_div(K, kShrinkBK);
    int64_t splits = split_count(gx * gy, k_tiles, exec.sms);
    const int64_t k_per_split = ceil_div(k_tiles, splits) * kShrinkBK;
    splits = ceil_div(K, k_per_split);
    TORCH_CHECK(gy <= 65535 && splits <= 65535, "llm_adapters_C: shrink: shape too large");
    at::Tensor part = at::empty({splits, M, R}, x.options().dtype(at::kFloat));
    const Grid grid{gx, gy, splits};
    LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "shrink", [&] {
      const ShrinkArgs<scalar_t> args{
          x.data_ptr<scalar_t>(), M, K, w.data_ptr<float>(), w.stride(0), w.stride(1), R,
          part.data_ptr<float>(), br, k_per_split, make_dropout(threshold, seed),
          static_cast<float>(out_scale), vec_aligned<scalar_t>(x.data_ptr(), K)};
      if (exec.cuda) {
        check_launch(launch_shrink(args, grid, exec.stream));
      } else {
        emulate(grid, kShrinkSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
          shrink_block(args, b, tid, smem, s);
        });
      }
    });
    result = splits == 1 ? part.select(0, 0) : part.sum(0);
  }
  if (bias.has_value()) result.add_(bias.value());
  return result;
}

// ----------------------------------------------------------------------------------------------
// expand_add_
// ----------------------------------------------------------------------------------------------

void expand_add_(const at::Tensor& out, const c10::optional<at::Tensor>& input,
                 const at::Tensor& h, int64_t act, const at::Tensor& w,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                 double scaling, int64_t threshold, int64_t seed) {
  check_matrix(out, "expand_add_: out");
  check_matrix(h, "expand_add_: h");
  check_matrix(w, "expand_add_: w");
  check_same_device(h, out, "expand_add_: h");
  check_same_device(w, out, "expand_add_: w");
  check_activation(act);
  check_threshold(threshold);
  TORCH_CHECK(out.is_contiguous(), "llm_adapters_C: expand_add_: out must be contiguous");
  const int64_t M = out.size(0), N = out.size(1);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(0) == M,
              "llm_adapters_C: expand_add_: h must be a contiguous float32 [", M,
              ", r] tensor, got ", h.scalar_type(), " ", h.sizes());
  const int64_t R = h.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.size(0) == N && w.size(1) == R,
              "llm_adapters_C: expand_add_: w must be float32 of shape [", N, ", ", R,
              "], got ", w.scalar_type(), " ", w.sizes());
  const at::Tensor& in = input.has_value() ? input.value() : out;
  if (input.has_value()) {
    check_same_device(in, out, "expand_add_: input");
    TORCH_CHECK(in.scalar_type() == out.scalar_type() && in.sizes() == out.sizes() &&
                    in.is_contiguous(),
                "llm_adapters_C: expand_add_: input must be contiguous with out's dtype ",
                out.scalar_type(), " and shape ", out.sizes(), ", got ", in.scalar_type(), " ",
                in.sizes());
  }
  check_f32_vector(bias, N, out, "expand_add_: bias");
  if (scale.has_value()) {
    const at::Tensor& s = scale.value();
    check_same_device(s, out, "expand_add_: scale");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1,
                "llm_adapters_C: expand_add_: scale must be a one-element float32 tensor, got ",
                s.scalar_type(), " ", s.sizes());
  }
  if (M == 0 || N == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(out));
  const Exec exec = exec_for(out);
  TORCH_CHECK(ceil_div(N, kExpandBN) <= 65535, "llm_adapters_C: expand_add_: too many columns (",
              N, ")");
  const Grid grid{ceil_div(M, kExpandBM), ceil_div(N, kExpandBN), 1};
  const float* bias_ptr = bias.has_value() ? bias.value().data_ptr<float>() : nullptr;
  const float* scale_ptr = scale.has_value() ? scale.value().data_ptr<float>() : nullptr;
  LA_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "expand_add_", [&] {
    const bool vec_ok = vec_aligned<scalar_t>(out.data_ptr(), N) &&
                        vec_aligned<scalar_t>(in.data_ptr(), N);
    const ExpandArgs<scalar_t> args{
        out.data_ptr<scalar_t>(), in.data_ptr<scalar_t>(), M, N, h.data_ptr<float>(), R,
        static_cast<int>(act), w.data_ptr<float>(), w.stride(0), w.stride(1), bias_ptr,
        scale_ptr, static_cast<float>(scaling), make_dropout(threshold, seed), vec_ok};
    if (exec.cuda) {
      check_launch(launch_expand(args, grid, exec.stream));
    } else {
      emulate(grid, kExpandSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
        expand_block(args, b, tid, smem, s);
      });
    }
  });
}

// ----------------------------------------------------------------------------------------------
// reduce_rows
// ----------------------------------------------------------------------------------------------

at::Tensor reduce_rows(const at::Tensor& x, const at::Tensor& h, int64_t act, int64_t threshold,
                       int64_t seed) {
  check_matrix(x, "reduce_rows: x");
  check_matrix(h, "reduce_rows: h");
  check_same_device(h, x, "reduce_rows: h");
  check_activation(act);
  check_threshold(threshold);
  TORCH_CHECK(x.is_contiguous(), "llm_adapters_C: reduce_rows: x must be contiguous");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.size(0) == M,
              "llm_adapters_C: reduce_rows: h must be a contiguous float32 [", M,
              ", r] tensor, got ", h.scalar_type(), " ", h.sizes());
  const int64_t R = h.size(1);
  TORCH_CHECK(R >= 1, "llm_adapters_C: reduce_rows: the rank must be at least 1");
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(x));
  if (M == 0 || N == 0) return at::zeros({N, R}, x.options().dtype(at::kFloat));
  const Exec exec = exec_for(x);
  const int br = rank_tile(R);
  const int64_t gx = ceil_div(N, shrink_layout(br).bm), gy = ceil_div(R, br);
  const int64_t m_tiles = ceil_div(M, kReduceBM);
  int64_t splits = split_count(gx * gy, m_tiles, exec.sms);
  const int64_t rows_per_split = ceil_div(m_tiles, splits) * kReduceBM;
  splits = ceil_div(M, rows_per_split);
  TORCH_CHECK(gy <= 65535 && splits <= 65535, "llm_adapters_C: reduce_rows: shape too large");
  at::Tensor part = at::empty({splits, N, R}, x.options().dtype(at::kFloat));
  const Grid grid{gx, gy, splits};
  LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "reduce_rows", [&] {
    const ReduceArgs<scalar_t> args{
        x.data_ptr<scalar_t>(), M, N, h.data_ptr<float>(), R, static_cast<int>(act),
        part.data_ptr<float>(), br, rows_per_split, make_dropout(threshold, seed),
        vec_aligned<scalar_t>(x.data_ptr(), N)};
    if (exec.cuda) {
      check_launch(launch_reduce_rows(args, grid, exec.stream));
    } else {
      emulate(grid, kReduceSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
        reduce_rows_block(args, b, tid, smem, s);
      });
    }
  });
  return splits == 1 ? part.select(0, 0) : part.sum(0);
}

// ----------------------------------------------------------------------------------------------
// keep_mask_
// ----------------------------------------------------------------------------------------------

void keep_mask_(const at::Tensor& out, int64_t threshold, int64_t seed) {
  TORCH_CHECK(out.scalar_type() == at::kBool && out.is_contiguous(),
              "llm_adapters_C: keep_mask_: out must be a contiguous bool tensor, got ",
              out.scalar_type());
  check_threshold(threshold);
  DropoutParams drop = make_dropout(threshold, seed);
  drop.enabled = true;
  const int64_t numel = out.numel();
  if (numel == 0) return;
  if (out.is_cuda()) {
    const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(out));
    check_launch(launch_keep_mask(out.data_ptr<bool>(), numel, drop, exec_for(out).stream));
    return;
  }
  bool* data = out.data_ptr<bool>();
  for (int64_t i = 0; i < numel; ++i) data[i] = keep_element(drop, static_cast<uint64_t>(i));
}

}  // namespace

TORCH_LIBRARY(llm_adapters_C, m) {
  // S = D(x) wᵀ · out_scale (+ bias): x [M, K] (f16/bf16/f32), w [r, K] f32 -> [M, r] f32
  m.def("shrink(Tensor x, Tensor w, Tensor? bias, int threshold, float out_scale, int seed) "
        "-> Tensor");
  // out = input (or out) + keep · scaling · scale · φ(h) wᵀ + bias: h [M, r] f32, w [N, r] f32
  m.def("expand_add_(Tensor(a!) out, Tensor? input, Tensor h, int act, Tensor w, Tensor? bias, "
        "Tensor? scale, float scaling, int threshold, int seed) -> ()");
  // Σ_m D(x)[m, n] φ(h[m, j]): x [M, N], h [M, r] f32 -> [N, r] f32
  m.def("reduce_rows(Tensor x, Tensor h, int act, int threshold, int seed) -> Tensor");
  // out (bool, row-major) = the dropout keep-mask for its linear indices
  m.def("keep_mask_(Tensor(a!) out, int threshold, int seed) -> ()");
}

TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) {
  m.impl("shrink", &shrink);
  m.impl("expand_add_", &expand_add_);
  m.impl("reduce_rows", &reduce_rows);
  m.impl("keep_mask_", &keep_mask_);
}

TORCH_LIBRARY_IMPL(llm_adapters_C, CPU, m) {
  m.impl("shrink", &shrink);
  m.impl("expand_add_", &expand_add_);
  m.impl("reduce_rows", &reduce_rows);
  m.impl("keep_mask_", &keep_mask_);
}

}  // namespace llm_adapters

// `import llm_adapters._C` loads this library, whose static initialisers register the ops
// above; the module itself exposes nothing.
static struct PyModuleDef llm_adapters_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "CUDA kernels of llm_adapters (torch.ops.llm_adapters_C)", -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&llm_adapters_c_module); }
