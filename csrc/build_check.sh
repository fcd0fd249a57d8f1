#!/usr/bin/env bash
# Builds the CUDA extension (sm_90 only) with the same sources and flags as setup.py, through
# torch's JIT loader, loads it, and runs a smoke check of its ops; prints the time taken.
# A compile error exits non-zero. Needs nvcc and ninja, no GPU.
#
#   bash csrc/build_check.sh                   # builds in a temporary folder, removed after
#   LLM_ADAPTERS_CUDA_BUILD_DIR=/tmp/la_cuda bash csrc/build_check.sh
#       keeps the build there; pytest run with the same LLM_ADAPTERS_CUDA_BUILD_DIR and
#       LLM_ADAPTERS_CUDA_ARCHS=9.0 then reuses it instead of compiling again.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export LLM_ADAPTERS_CUDA_ARCHS="${LLM_ADAPTERS_CUDA_ARCHS:-9.0}"
if [[ -z "${LLM_ADAPTERS_CUDA_BUILD_DIR:-}" ]]; then
  LLM_ADAPTERS_CUDA_BUILD_DIR="$(mktemp -d -t llm_adapters_cuda.XXXXXX)"
  trap 'rm -rf "$LLM_ADAPTERS_CUDA_BUILD_DIR"' EXIT
fi
export LLM_ADAPTERS_CUDA_BUILD_DIR
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

start=$(date +%s)
"$PYTHON" - <<'PY'
import torch

from llm_adapters.ops import cuda_backend

cuda_backend.load_extension(prefer_prebuilt=False)
loaded, how = cuda_backend.extension_status()
assert loaded, how
ops = torch.ops.llm_adapters_C
for name in (
    "shrink", "expand_add_", "reduce_rows", "keep_mask_", "series_forward", "grad_rows"
):
    getattr(ops, name)  # raises when the op is not registered
mask = cuda_backend.keep_mask((3, 5), 0.5, 1234, torch.device("cpu"))
assert mask.shape == (3, 5) and mask.dtype == torch.bool
print(f"llm_adapters CUDA extension OK: {how}")
PY
end=$(date +%s)
echo "build_check: archs ${LLM_ADAPTERS_CUDA_ARCHS}, ${MAX_JOBS} jobs, $((end - start)) s"
