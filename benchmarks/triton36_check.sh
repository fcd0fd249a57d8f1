#!/usr/bin/env bash
# The GPU machines' stack on a CPU: torch 2.11, triton 3.6 and transformers 5.17 (CI installs
# newer ones). In a fresh virtual environment under SCRATCH_DIR: install that stack from the
# package registry (numpy as pip resolves it), install this project without its dependencies,
# import every module of llm_adapters/triton_kernels (compiled mode, as on a GPU, and under the
# interpreter), then run the Triton interpreter tests of the LoRA, DoRA, series and grouped kernels.
#
#   benchmarks/triton36_check.sh SCRATCH_DIR [PYTEST_ARGS...]
#
# SCRATCH_DIR holds the venv (~5 GB with torch's CUDA libraries; reused when it is already
# there) and the caches; the caller removes it. PYTEST_ARGS replace the default test selection.
# Exit status: 0 when the install, the imports and the tests pass.

set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 SCRATCH_DIR [PYTEST_ARGS...]" >&2
  exit 2
fi
mkdir -p "$1"
SCRATCH="$(cd "$1" && pwd)"
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - START )) s] $*"; }

VENV="$SCRATCH/venv-triton36"
export TRITON_CACHE_DIR="$SCRATCH/triton" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor"
stamp "venv: $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

stamp "install: torch 2.11, triton 3.6, transformers 5.17, test dependencies"
"$PY" -m pip install --quiet --disable-pip-version-check \
  "torch==2.11.*" "triton==3.6.*" "transformers==5.17.*" peft pytest
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps -e .
"$PY" -c "import numpy, torch, transformers, triton; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, \
'| numpy', numpy.__version__)"
"$PY" -c "import triton, sys; sys.exit(0 if triton.__version__.startswith('3.6') else \
f'expected triton 3.6, got {triton.__version__}')"

IMPORT_ALL='
import importlib, pkgutil, sys
import llm_adapters.triton_kernels as pkg
names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
for name in names:
    importlib.import_module(f"llm_adapters.triton_kernels.{name}")
print("imported", ", ".join(names))
'
stamp "import every kernel module, compiled mode (TRITON_INTERPRET=0)"
TRITON_INTERPRET=0 "$PY" -c "$IMPORT_ALL"
stamp "import every kernel module, interpreter (TRITON_INTERPRET=1)"
TRITON_INTERPRET=1 "$PY" -c "$IMPORT_ALL"

if [ $# -eq 0 ]; then
  set -- tests/test_triton_lora.py tests/test_triton_series.py tests/test_triton_lora_add.py \
    tests/test_triton_dora.py \
    tests/test_grouped_lora.py
fi
stamp "tests: pytest $*"
# conftest.py sets TRITON_INTERPRET=1 when no GPU is present.
"$PY" -m pytest -q -p no:cacheprovider "$@"

if [ -n "${AOT_OUT:-}" ]; then
  stamp "ahead-of-time compile check under triton 3.6 (sm_80, sm_90; CI subset)"
  TRITON_INTERPRET=0 "$PY" -m llm_adapters.triton_kernels.aot --subset ci --jobs 2 \
    --cache none --out "$AOT_OUT"
fi
stamp "done"
