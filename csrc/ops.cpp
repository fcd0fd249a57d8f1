// The low-level ops of llm_adapters._C (namespace torch.ops.llm_adapters_C): schemas, input
// checks, grid sizing and dispatch to the kernels (common.cuh lists them), and the Python module
// entry.
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
#include <tuple>
#include <vector>

#include "common.cuh"
#include "expand.cuh"
#include "mma.cuh"
#include "reduce_rows.cuh"
#include "row_block.cuh"
#include "shrink.cuh"
#include "tc.cuh"

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
// time, with kThreads host threads per block. The shared-memory buffer is 128-byte aligned, as
// a __shared__ array may be (the tile MMAs need 32 bytes); a precondition violation that the
// host tile MMAs (mma.cuh) recorded becomes an error here.
template <typename Body>
void emulate(Grid grid, int smem_floats, const Body& body) {
  constexpr size_t kAlignFloats = 128 / sizeof(float);
  std::vector<float> buffer(static_cast<size_t>(smem_floats) + kAlignFloats);
  const size_t skew = reinterpret_cast<uintptr_t>(buffer.data()) % 128 / sizeof(float);
  float* const smem_base = buffer.data() + (skew == 0 ? 0 : kAlignFloats - skew);
  mma::host_error().store(nullptr);
  for (int64_t z = 0; z < grid.z; ++z) {
    for (int64_t y = 0; y < grid.y; ++y) {
      for (int64_t x = 0; x < grid.x; ++x) {
        HostBarrier barrier(kThreads);
        std::vector<std::thread> threads;
        threads.reserve(kThreads);
        for (int tid = 0; tid < kThreads; ++tid) {
          threads.emplace_back([&, tid] { body(BlockIdx{x, y, z}, tid, smem_base, barrier); });
        }
        for (auto& t : threads) t.join();
      }
    }
  }
  const char* error = mma::host_error().exchange(nullptr);
  TORCH_CHECK(error == nullptr, "llm_adapters_C: emulated kernel broke a WMMA precondition: ",
              error);
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

// The grid of a split reduction (shrink over K, reduce_rows over M): gx x gy blocks, and the
// reduced extent cut over blockIdx.z into splits of whole `step`s (per_split, a multiple of
// step; none empty) so that blocks * splits fills about two waves of the SMs. Their partials
// are summed afterwards in split order.
struct SplitGrid {
  Grid grid;
  int64_t per_split;
};

SplitGrid plan_splits(int64_t gx, int64_t gy, int64_t extent, int64_t step, int sms,
                      const char* op) {
  const int64_t blocks = gx * gy;
  const int64_t tiles = ceil_div(extent, step);
  int64_t splits = blocks >= 2 * sms
                       ? 1
                       : std::max<int64_t>(1, std::min<int64_t>(tiles, ceil_div(2 * sms, blocks)));
  const int64_t per_split = ceil_div(tiles, splits) * step;
  splits = ceil_div(extent, per_split);
  TORCH_CHECK(gy <= 65535 && splits <= 65535, "llm_adapters_C: ", op, ": shape too large");
  return SplitGrid{Grid{gx, gy, splits}, per_split};
}

// The device to make current for a launch: the tensor's, when it is a CUDA tensor.
c10::optional<c10::Device> cuda_device_of(const at::Tensor& t) {
  if (t.is_cuda()) return t.device();
  return c10::nullopt;
}

// ----------------------------------------------------------------------------------------------
// shrink
// ----------------------------------------------------------------------------------------------

// Whether the tensor-core variant of an op can run for x (the activations, or expand's out):
// 16-bit x, asked for, and (on a GPU) sm_80+.
bool use_tensor_cores(const at::Tensor& x, bool tensor_cores) {
  if (!tensor_cores || (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)) {
    return false;
  }
  if (!x.is_cuda()) return true;  // the host emulation runs the same tile code
  int major = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index()));
  return major >= 8;
}

// The tensor-core shrink (16-bit x): 256 rows x up to 64 ranks per block (r rounded up to 16;
// 1, 2 or 4 accumulator tiles), K in steps of 32.
template <typename T>
void shrink_tc(const at::Tensor& x, const at::Tensor& w, at::Tensor& part_out, int64_t threshold,
               double out_scale, int64_t seed, const Exec& exec) {
  const int64_t M = x.size(0), K = x.size(1), R = w.size(0);
  const int br = tc_rank_tile(R);
  const SplitGrid split =
      plan_splits(ceil_div(M, kTcBM), ceil_div(R, br), K, kTcBK, exec.sms, "shrink");
  const Grid& grid = split.grid;
  part_out = at::empty({grid.z, M, R}, x.options().dtype(at::kFloat));
  const ShrinkArgs<T> args{
      x.data_ptr<T>(), M, K, w.data_ptr<float>(), w.stride(0), w.stride(1), R,
      part_out.data_ptr<float>(), br, split.per_split, make_dropout(threshold, seed),
      static_cast<float>(out_scale), vec_aligned<T>(x.data_ptr(), K)};
  const int nt = tc_rank_tiles(br);
  if (exec.cuda) {
    check_launch(launch_shrink_tc(args, grid, nt, exec.stream));
  } else {
    with_rank_tiles(nt, [&](auto tiles) {
      emulate(grid, kTcSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
        shrink_tc_block<decltype(tiles)::value>(args, b, tid, smem, s);
      });
    });
  }
}

at::Tensor shrink(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  int64_t threshold, double out_scale, int64_t seed, bool tensor_cores) {
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
  } else if (use_tensor_cores(x, tensor_cores)) {
    const Exec exec = exec_for(x);
    at::Tensor part;
    if (x.scalar_type() == at::kHalf) {
      shrink_tc<c10::Half>(x, w, part, threshold, out_scale, seed, exec);
    } else {
      shrink_tc<c10::BFloat16>(x, w, part, threshold, out_scale, seed, exec);
    }
    result = part.size(0) == 1 ? part.select(0, 0) : part.sum(0);
  } else {
    const Exec exec = exec_for(x);
    const int br = rank_tile(R);
    const SplitGrid split = plan_splits(ceil_div(M, shrink_layout(br).bm), ceil_div(R, br), K,
                                        kShrinkBK, exec.sms, "shrink");
    const Grid& grid = split.grid;
    at::Tensor part = at::empty({grid.z, M, R}, x.options().dtype(at::kFloat));
    LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "shrink", [&] {
      const ShrinkArgs<scalar_t> args{
          x.data_ptr<scalar_t>(), M, K, w.data_ptr<float>(), w.stride(0), w.stride(1), R,
          part.data_ptr<float>(), br, split.per_split, make_dropout(threshold, seed),
          static_cast<float>(out_scale), vec_aligned<scalar_t>(x.data_ptr(), K)};
      if (exec.cuda) {
        check_launch(launch_shrink(args, grid, exec.stream));
      } else {
        emulate(grid, kShrinkSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
          shrink_block(args, b, tid, smem, s);
        });
      }
    });
    result = grid.z == 1 ? part.select(0, 0) : part.sum(0);
  }
  if (bias.has_value()) result.add_(bias.value());
  return result;
}

// ----------------------------------------------------------------------------------------------
// expand_add_
// ----------------------------------------------------------------------------------------------

// The kernels' view of an expand: out = in + keep · scaling · scale · φ(h) wᵀ + bias.
template <typename T>
ExpandArgs<T> expand_args(const at::Tensor& out, const at::Tensor& in, const at::Tensor& h,
                          int64_t act, const at::Tensor& w, const float* bias,
                          const float* scale_ptr, double scaling, DropoutParams drop,
                          const float* col_scale = nullptr, T* t_out = nullptr) {
  const int64_t N = out.size(1);
  const bool vec_ok = vec_aligned<T>(out.data_ptr(), N) && vec_aligned<T>(in.data_ptr(), N) &&
                      (t_out == nullptr || vec_aligned<T>(t_out, N));
  return ExpandArgs<T>{out.data_ptr<T>(), in.data_ptr<T>(), out.size(0), N, h.data_ptr<float>(),
                       h.size(1), static_cast<int>(act), w.data_ptr<float>(), w.stride(0),
                       w.stride(1), bias, scale_ptr, static_cast<float>(scaling), drop,
                       vec_ok, col_scale, t_out};
}

// expand_tc_block for 16-bit out (the CUDA-core kernel's tiles and grid). float32 never gets
// here (use_tensor_cores); the branch only keeps the dispatch macro's float case compiling.
template <typename T>
void expand_tc(const ExpandArgs<T>& args, Grid grid, const Exec& exec) {
  if constexpr (std::is_same<T, float>::value) {
    TORCH_CHECK(false, "llm_adapters_C: expand_add_: the tensor-core variant takes 16-bit out");
  } else if (exec.cuda) {
    check_launch(launch_expand_tc(args, grid, exec.stream));
  } else {
    emulate(grid, kEtSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
      expand_tc_block(args, b, tid, smem, s);
    });
  }
}

void expand_add_(const at::Tensor& out, const c10::optional<at::Tensor>& input,
                 const at::Tensor& h, int64_t act, const at::Tensor& w,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scale,
                 double scaling, int64_t threshold, int64_t seed, bool tensor_cores,
                 const c10::optional<at::Tensor>& col_scale,
                 const c10::optional<at::Tensor>& t_out) {
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
  check_f32_vector(col_scale, N, out, "expand_add_: col_scale");
  if (t_out.has_value()) {
    const at::Tensor& t = t_out.value();
    TORCH_CHECK(col_scale.has_value(),
                "llm_adapters_C: expand_add_: t_out (DoRA's T) needs a col_scale");
    check_same_device(t, out, "expand_add_: t_out");
    TORCH_CHECK(t.scalar_type() == out.scalar_type() && t.sizes() == out.sizes() &&
                    t.is_contiguous() && !t.is_same(out),
                "llm_adapters_C: expand_add_: t_out must be a contiguous tensor of out's dtype ",
                out.scalar_type(), " and shape ", out.sizes(), " other than out, got ",
                t.scalar_type(), " ", t.sizes());
  }
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
  const bool tc = use_tensor_cores(out, tensor_cores);
  LA_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "expand_add_", [&] {
    const ExpandArgs<scalar_t> args = expand_args<scalar_t>(
        out, in, h, act, w, bias_ptr, scale_ptr, scaling, make_dropout(threshold, seed),
        col_scale.has_value() ? col_scale.value().data_ptr<float>() : nullptr,
        t_out.has_value() ? t_out.value().data_ptr<scalar_t>() : nullptr);
    if (tc) {
      expand_tc(args, grid, exec);
    } else if (exec.cuda) {
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

// The tensor-core reduce_rows (16-bit x): 256 columns x up to 64 ranks per block, M in steps
// of 32 rows; returns the [splits, N, r] partials.
template <typename T>
at::Tensor reduce_rows_tc(const at::Tensor& x, const at::Tensor& h, int64_t act,
                          int64_t threshold, int64_t seed, const Exec& exec) {
  const int64_t M = x.size(0), N = x.size(1), R = h.size(1);
  const int br = tc_rank_tile(R);
  const SplitGrid split =
      plan_splits(ceil_div(N, kRtBN), ceil_div(R, br), M, kRtBM, exec.sms, "reduce_rows");
  const Grid& grid = split.grid;
  at::Tensor part = at::empty({grid.z, N, R}, x.options().dtype(at::kFloat));
  const ReduceArgs<T> args{
      x.data_ptr<T>(), M, N, h.data_ptr<float>(), R, static_cast<int>(act),
      part.data_ptr<float>(), br, split.per_split, make_dropout(threshold, seed),
      vec_aligned<T>(x.data_ptr(), N)};
  const int nt = tc_rank_tiles(br);
  if (exec.cuda) {
    check_launch(launch_reduce_rows_tc(args, grid, nt, exec.stream));
  } else {
    with_rank_tiles(nt, [&](auto tiles) {
      emulate(grid, kRtSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
        reduce_rows_tc_block<decltype(tiles)::value>(args, b, tid, smem, s);
      });
    });
  }
  return part;
}

at::Tensor reduce_rows(const at::Tensor& x, const at::Tensor& h, int64_t act, int64_t threshold,
                       int64_t seed, bool tensor_cores) {
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
  if (use_tensor_cores(x, tensor_cores)) {
    const at::Tensor part =
        x.scalar_type() == at::kHalf
            ? reduce_rows_tc<c10::Half>(x, h, act, threshold, seed, exec)
            : reduce_rows_tc<c10::BFloat16>(x, h, act, threshold, seed, exec);
    return part.size(0) == 1 ? part.select(0, 0) : part.sum(0);
  }
  const int br = rank_tile(R);
  const SplitGrid split = plan_splits(ceil_div(N, shrink_layout(br).bm), ceil_div(R, br), M,
                                      kReduceBM, exec.sms, "reduce_rows");
  const Grid& grid = split.grid;
  at::Tensor part = at::empty({grid.z, N, R}, x.options().dtype(at::kFloat));
  LA_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "reduce_rows", [&] {
    const ReduceArgs<scalar_t> args{
        x.data_ptr<scalar_t>(), M, N, h.data_ptr<float>(), R, static_cast<int>(act),
        part.data_ptr<float>(), br, split.per_split, make_dropout(threshold, seed),
        vec_aligned<scalar_t>(x.data_ptr(), N)};
    if (exec.cuda) {
      check_launch(launch_reduce_rows(args, grid, exec.stream));
    } else {
      emulate(grid, kReduceSmemFloats, [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
        reduce_rows_block(args, b, tid, smem, s);
      });
    }
  });
  return grid.z == 1 ? part.select(0, 0) : part.sum(0);
}

// ----------------------------------------------------------------------------------------------
// Row-block ops: series_forward, grad_rows
// ----------------------------------------------------------------------------------------------

// A float32 [rows, cols] weight, contiguous (the row-block kernels stage it row by row).
void check_rank_weight(const at::Tensor& w, int64_t rows, int64_t cols, const at::Tensor& ref,
                       const char* name) {
  check_same_device(w, ref, name);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == rows &&
                  w.size(1) == cols && w.is_contiguous(),
              "llm_adapters_C: ", name, " must be a contiguous float32 [", rows, ", ", cols,
              "] tensor, got ", w.scalar_type(), " ", w.sizes());
}

const float* scale_pointer(const c10::optional<at::Tensor>& scale, const at::Tensor& ref,
                           const char* name) {
  if (!scale.has_value()) return nullptr;
  const at::Tensor& s = scale.value();
  check_same_device(s, ref, name);
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == 1,
              "llm_adapters_C: ", name, " must be a one-element float32 tensor, got ",
              s.scalar_type(), " ", s.sizes());
  return s.data_ptr<float>();
}

// The row-block CUDA-core kernels (series_fwd_block, grad_rows_block): one block per 64 rows,
// RT = kRowWideRT rank tiles per pass over the rows when `wide`, else 1. launch() starts the
// CUDA kernel; body(rt, block, tid, smem, sync) runs one block of the RT = rt instantiation on
// host threads.
template <typename Launch, typename Body>
void row_cc(int64_t blocks, bool wide, const Exec& exec, const Launch& launch, const Body& body) {
  if (exec.cuda) {
    check_launch(launch());
    return;
  }
  const auto run = [&](auto rt) {
    emulate(Grid{blocks, 1, 1}, row_fused_smem_floats<decltype(rt)::value>(),
            [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
              body(rt, b.x, tid, smem, s);
            });
  };
  if (wide) {
    run(std::integral_constant<int, kRowWideRT>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// The row-block tensor-core kernels (series_fwd_tc_block, grad_rows_tc_block) for 16-bit
// activations: one block per 64 rows, rank passes of up to 64 (NT accumulator tiles of 16),
// the tile buffer kGtSmemFloats. launch(nt) starts the CUDA kernel; body(tiles, block, tid,
// smem, sync) runs one block of the NT = tiles instantiation on host threads.
template <typename Launch, typename Body>
void row_tc(int64_t blocks, int64_t R, const Exec& exec, const Launch& launch, const Body& body) {
  const int nt = tc_rank_tiles(tc_rank_tile(R));
  if (exec.cuda) {
    check_launch(launch(nt));
    return;
  }
  with_rank_tiles(nt, [&](auto tiles) {
    emulate(Grid{blocks, 1, 1}, kGtSmemFloats,
            [&](BlockIdx b, int tid, float* smem, HostBarrier& s) {
              body(tiles, b.x, tid, smem, s);
            });
  });
}

// series_fwd_tc_block. float32 h never gets here (use_tensor_cores); the branch only keeps the
// dispatch macro's float case compiling.
template <typename T>
void series_fwd_tc(const SeriesFwdArgs<T>& args, int64_t blocks, int64_t R, const Exec& exec) {
  if constexpr (std::is_same<T, float>::value) {
    TORCH_CHECK(false, "llm_adapters_C: series_forward: the tensor-core variant takes 16-bit h");
  } else {
    const auto launch = [&](int nt) {
      return launch_series_fwd_tc(args, blocks, nt, exec.stream);
    };
    row_tc(blocks, R, exec, launch,
           [&](auto tiles, int64_t mb, int tid, float* smem, HostBarrier& s) {
             series_fwd_tc_block<decltype(tiles)::value>(args, mb, tid, smem, s);
           });
  }
}

// z = h + s·φ(D(h) Dnᵀ · out_scale + d_b) Upᵀ + u_b and s_pre = D(h) Dnᵀ · out_scale + d_b, one
// block per 64 rows. down_t: Dn as a contiguous [N, r] tensor; up: [N, r].
std::tuple<at::Tensor, at::Tensor> series_forward(
    const at::Tensor& h, const at::Tensor& down_t, const at::Tensor& up,
    const c10::optional<at::Tensor>& down_bias, const c10::optional<at::Tensor>& up_bias,
    const c10::optional<at::Tensor>& scale, double scaling, int64_t act, int64_t threshold,
    double out_scale, int64_t seed, bool tensor_cores) {
  check_matrix(h, "series_forward: h");
  TORCH_CHECK(h.is_contiguous(), "llm_adapters_C: series_forward: h must be contiguous");
  check_activation(act);
  check_threshold(threshold);
  const int64_t M = h.size(0), N = h.size(1);
  TORCH_CHECK(down_t.dim() == 2 && down_t.size(1) >= 1,
              "llm_adapters_C: series_forward: the bottleneck must be at least 1, got down_t ",
              down_t.sizes());
  const int64_t R = down_t.size(1);
  check_rank_weight(down_t, N, R, h, "series_forward: down_t");
  check_rank_weight(up, N, R, h, "series_forward: up");
  check_f32_vector(down_bias, R, h, "series_forward: down_bias");
  check_f32_vector(up_bias, N, h, "series_forward: up_bias");
  const float* scale_ptr = scale_pointer(scale, h, "series_forward: scale");
  at::Tensor z = at::empty({M, N}, h.options());
  at::Tensor s_pre = at::empty({M, R}, h.options().dtype(at::kFloat));
  if (M == 0) return {z, s_pre};
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(h));
  const Exec exec = exec_for(h);
  const int64_t blocks = ceil_div(M, kRowBM);
  TORCH_CHECK(blocks <= 2147483647, "llm_adapters_C: series_forward: too many rows (", M, ")");
  const DropoutParams drop = make_dropout(threshold, seed);
  const bool wide = R > kRowBR;  // up to 256 ranks per read of h
  // both products on the tensor cores for 16-bit h (sm_80+): rank passes of up to 64
  const bool tc = use_tensor_cores(h, tensor_cores);
  LA_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "series_forward", [&] {
    SeriesFwdArgs<scalar_t> args{
        RowShrinkArgs<scalar_t>{h.data_ptr<scalar_t>(), M, N, down_t.data_ptr<float>(), R, 1, R,
                                s_pre.data_ptr<float>(),
                                down_bias.has_value() ? down_bias->data_ptr<float>() : nullptr,
                                static_cast<float>(out_scale), drop, nullptr, 0, nullptr},
        expand_args<scalar_t>(z, h, s_pre, act, up,
                              up_bias.has_value() ? up_bias->data_ptr<float>() : nullptr,
                              scale_ptr, scaling, DropoutParams{})};
    args.vec_ok = vec_aligned<scalar_t>(h.data_ptr(), N);
    if (tc) {
      series_fwd_tc(args, blocks, R, exec);
    } else {
      row_cc(
          blocks, wide, exec, [&] { return launch_series_fwd(args, blocks, wide, exec.stream); },
          [&](auto rt, int64_t mb, int tid, float* smem, HostBarrier& s) {
            series_fwd_block<decltype(rt)::value>(args, mb, tid, smem, s);
          });
    }
  });
  return {z, s_pre};
}

// grad_rows_tc_block (the CUDA-core kernel's 64-row blocks, so the same partials); float32 g
// never gets here, as in series_fwd_tc.
template <typename T>
void grad_rows_tc(const GradRowsArgs<T>& args, int64_t blocks, int64_t R, const Exec& exec) {
  if constexpr (std::is_same<T, float>::value) {
    TORCH_CHECK(false, "llm_adapters_C: grad_rows: the tensor-core variant takes 16-bit g");
  } else {
    const auto launch = [&](int nt) {
      return launch_grad_rows_tc(args, blocks, nt, exec.stream);
    };
    row_tc(blocks, R, exec, launch,
           [&](auto tiles, int64_t mb, int tid, float* smem, HostBarrier& s) {
             grad_rows_tc_block<decltype(tiles)::value>(args, mb, tid, smem, s);
           });
  }
}

// One pass over g [M, N]:
//   dS = s·(g w) ⊙ φ'(s_pre)                                  [M, r] float32
//   d_w = s·gᵀ φ(s_pre)             (need_dw; else empty)      [N, r] float32
//   row_terms[m] = Σ_j (g w)[m, j] φ(s_pre)[m, j]  (need_row_terms; Σ_m is d(scale))
//   dh = g + keep · dh_scaling · dS dhwᵀ  (dh_w given, [N, r]; else empty)
// s = scaling · scale. d_w is summed over the 64-row blocks' partials in block order.
// tensor_cores: g w and the partials of 16-bit g on the tensor cores (sm_80+; as shrink's).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> grad_rows(
    const at::Tensor& g, const at::Tensor& w, const at::Tensor& s_pre, int64_t act,
    const c10::optional<at::Tensor>& scale, double scaling, bool need_dw, bool need_row_terms,
    const c10::optional<at::Tensor>& dh_w, double dh_scaling, int64_t threshold, int64_t seed,
    bool tensor_cores) {
  check_matrix(g, "grad_rows: g");
  TORCH_CHECK(g.is_contiguous(), "llm_adapters_C: grad_rows: g must be contiguous");
  check_activation(act);
  check_threshold(threshold);
  const int64_t M = g.size(0), N = g.size(1);
  check_same_device(s_pre, g, "grad_rows: s_pre");
  TORCH_CHECK(s_pre.scalar_type() == at::kFloat && s_pre.dim() == 2 && s_pre.size(0) == M &&
                  s_pre.size(1) >= 1 && s_pre.is_contiguous(),
              "llm_adapters_C: grad_rows: s_pre must be a contiguous float32 [", M,
              ", r >= 1] tensor, got ", s_pre.scalar_type(), " ", s_pre.sizes());
  const int64_t R = s_pre.size(1);
  check_rank_weight(w, N, R, g, "grad_rows: w");
  if (dh_w.has_value()) check_rank_weight(dh_w.value(), N, R, g, "grad_rows: dh_w");
  const float* scale_ptr = scale_pointer(scale, g, "grad_rows: scale");
  const auto f32 = g.options().dtype(at::kFloat);
  at::Tensor ds = at::empty({M, R}, f32);
  at::Tensor d_w = need_dw ? at::zeros({N, R}, f32) : at::empty({0}, f32);
  at::Tensor row_terms = need_row_terms ? at::empty({M}, f32) : at::empty({0}, f32);
  at::Tensor dh = dh_w.has_value() ? at::empty({M, N}, g.options()) : at::empty({0}, g.options());
  if (M == 0) return {ds, d_w, row_terms, dh};
  const c10::cuda::OptionalCUDAGuard guard(cuda_device_of(g));
  const Exec exec = exec_for(g);
  const int64_t blocks = ceil_div(M, kRowBM);
  TORCH_CHECK(blocks <= 2147483647, "llm_adapters_C: grad_rows: too many rows (", M, ")");
  at::Tensor part = need_dw ? at::empty({blocks, N, R}, f32) : at::empty({0}, f32);
  // up to 256 ranks per read of g; the partials stage φ(S) in shared memory, 64 ranks at a time
  const bool wide = !need_dw && R > kRowBR;
  // G and the partials on the tensor cores for 16-bit g (sm_80+); the float32 parts as below
  const bool tc = use_tensor_cores(g, tensor_cores);
  LA_DISPATCH_FLOAT_HALF_BF16(g.scalar_type(), "grad_rows", [&] {
    const at::Tensor& dhw = dh_w.has_value() ? dh_w.value() : w;
    const at::Tensor& dh_out = dh_w.has_value() ? dh : g;
    GradRowsArgs<scalar_t> args{
        RowShrinkArgs<scalar_t>{g.data_ptr<scalar_t>(), M, N, w.data_ptr<float>(), R, 1, R,
                                ds.data_ptr<float>(), nullptr, 1.f, DropoutParams{},
                                s_pre.data_ptr<float>(), static_cast<int>(act),
                                need_dw ? part.data_ptr<float>() : nullptr},
        s_pre.data_ptr<float>(),
        need_row_terms ? row_terms.data_ptr<float>() : nullptr,
        scale_ptr,
        static_cast<float>(scaling),
        dh_w.has_value(),
        expand_args<scalar_t>(dh_out, g, ds, kIdentity, dhw, nullptr, nullptr, dh_scaling,
                              make_dropout(threshold, seed))};
    args.vec_ok = vec_aligned<scalar_t>(g.data_ptr(), N);
    if (tc) {
      grad_rows_tc(args, blocks, R, exec);
    } else {
      row_cc(
          blocks, wide, exec, [&] { return launch_grad_rows(args, blocks, wide, exec.stream); },
          [&](auto rt, int64_t mb, int tid, float* smem, HostBarrier& s) {
            grad_rows_block<decltype(rt)::value>(args, mb, tid, smem, s);
          });
    }
  });
  if (need_dw && N > 0) {
    const int64_t count = N * R;
    if (exec.cuda) {
      check_launch(launch_sum_partials(d_w.data_ptr<float>(), part.data_ptr<float>(), blocks,
                                       count, scale_ptr, static_cast<float>(scaling),
                                       exec.stream));
    } else {
      for (int64_t i = 0; i < count; ++i) {
        sum_partials_at(d_w.data_ptr<float>(), part.data_ptr<float>(), blocks, count, i,
                        scale_ptr, static_cast<float>(scaling));
      }
    }
  }
  return {ds, d_w, row_terms, dh};
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

// The schemas are defined in Python (llm_adapters/ops/_cuda_ops.py, with their fake
// implementations) before this library is loaded; here only the kernels are registered.
TORCH_LIBRARY_IMPL(llm_adapters_C, CUDA, m) {
  m.impl("series_forward", &series_forward);
  m.impl("grad_rows", &grad_rows);
  m.impl("shrink", &shrink);
  m.impl("expand_add_", &expand_add_);
  m.impl("reduce_rows", &reduce_rows);
  m.impl("keep_mask_", &keep_mask_);
}

TORCH_LIBRARY_IMPL(llm_adapters_C, CPU, m) {
  m.impl("series_forward", &series_forward);
  m.impl("grad_rows", &grad_rows);
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
