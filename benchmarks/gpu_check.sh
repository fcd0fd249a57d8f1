#!/usr/bin/env bash
# The one-command GPU check: the self-check (`llm-adapters check`: every backend vs float64),
# GPU tests, the skinny kernels' bandwidth, op benchmarks, the measured backend table, the
# end-to-end benchmark at default sizes and its QLoRA case (LoRA on a 4-bit NF4 base, ours vs
# PEFT), the mixed-adapter batch and DoRA layer benchmarks (ours vs PEFT), everything written
# into OUT_DIR, a summary table printed last. The part budgets add
# up to 450 s (under 8 minutes with the setup around them).
#
#   benchmarks/gpu_check.sh OUT_DIR              on a machine with an NVIDIA GPU
#   benchmarks/gpu_check.sh --dry-run OUT_DIR    print the plan, record the environment only
#   benchmarks/gpu_check.sh --cpu-smoke OUT_DIR  the same steps at tiny sizes on a CPU (checks
#                                                this script, not the GPU code)
#
# Installs nothing. Uses $PYTHON (default: python3, else python) from the repository root.
# Time budget per part (seconds), overridable: T_CHECK, T_TESTS, T_KERNELS, T_OPS, T_TUNE, T_E2E,
# T_QLORA, T_MIXED, T_DORA.
# SKIP_PARTS="kernels ..." leaves parts out (shown as skipped; they do not fail the run).
# Exit status: 0 when every part that ran passed, 1 otherwise (the summary says which).

set -uo pipefail

MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry; shift ;;
  --cpu-smoke) MODE=cpu; shift ;;
  -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
esac
if [ $# -ne 1 ]; then
  echo "usage: $0 [--dry-run|--cpu-smoke] OUT_DIR" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || { echo "cannot create $1" >&2; exit 2; }
OUT="$(cd "$1" && pwd)"
cd "$ROOT" || exit 2
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
SKIP_PARTS="${SKIP_PARTS:-}"
START=$(date +%s)

# ---- the device first --------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
else
  DEVICE=""
fi
echo "device: ${DEVICE:-no NVIDIA GPU found (nvidia-smi missing or failing)}"
if [ "$MODE" = gpu ] && [ -z "$DEVICE" ]; then
  echo "no NVIDIA GPU: use --cpu-smoke (or --dry-run) to exercise this script on a CPU" >&2
  exit 2
fi

# ---- the environment -----------------------------------------------------------------------
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "mode: $MODE"
  echo "repo: $ROOT"
  echo "git_commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "git_dirty: $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l) modified file(s)"
  echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
  echo "--- nvidia-smi -L"
  nvidia-smi -L 2>&1 || echo "nvidia-smi unavailable"
  echo "--- nvidia-smi"
  nvidia-smi 2>&1 || true
  echo "--- versions"
  "$PYTHON" - <<'EOF' 2>&1
import importlib
for name in ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "matplotlib",
             "pytest", "llm_adapters"):
    try:
        mod = importlib.import_module(name)
        print(f"{name}: {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
import torch
print(f"torch.cuda: {torch.version.cuda}  available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.1f} GiB  {p.multi_processor_count} SMs")
from llm_adapters import ops
for b in ops.BACKENDS:
    print(f"backend {b}: {ops.backend_status(b) or 'available'}")
EOF
} > "$OUT/environment.txt" 2>&1
echo "environment: $OUT/environment.txt"
grep -E '^(torch|triton|transformers|peft|backend|gpu)' "$OUT/environment.txt" | sed 's/^/  /'

# ---- the plan --------------------------------------------------------------------------------
# Budgets: on a GPU they add up to 450 s (check 75, tests 95, kernels 40, ops 80, tune 55,
# e2e 55, qlora 20, mixed 15, dora 15), leaving 30 s for the environment record and the summary
# within 8 minutes. The mixed-batch and DoRA parts time one 4096 x 4096 bf16 layer (a few
# rounds each: a first figure, not a tuned one).
# The QLoRA case runs in a process of its own, so that it cannot cost the e2e part its rows:
# about 10 s of start-up and model building (an estimate: not yet timed on a GPU), then
# 2 x 13 steps (3 of them warm-up) of the e2e GPU model (LLaMA-7B widths, 4 layers, 4 x 1024
# tokens a step) with its linears in 4-bit NF4 (bitsandbytes' kernels, no Triton compiles).
# The CPU smoke run checks the wiring, not the time: its budgets only stop a hang, on a loaded
# machine.
if [ "$MODE" = cpu ]; then
  T_CHECK="${T_CHECK:-240}" T_TESTS="${T_TESTS:-300}" T_OPS="${T_OPS:-240}"
  T_TUNE="${T_TUNE:-120}" T_E2E="${T_E2E:-240}" T_QLORA="${T_QLORA:-240}"
  CHECK_ARGS=(--device cpu --reps 1)  # torch, and triton under the interpreter
  BENCH_ARGS=(--quick --device cpu)
  TEST_ARGS=(-m gpu)  # collected and skipped without a GPU: checks the wiring only
  TUNE_ARGS=(--device cpu --tokens 64 --hidden 64 --rank 8 --dropout 0)
  # two candidates to choose between on a CPU: torch, and triton under the interpreter
  TUNE_ENV=(env TRITON_INTERPRET=1)
  T_MIXED="${T_MIXED:-240}" T_DORA="${T_DORA:-240}"
  MIXED_ARGS=(--device cpu --kn 64 --r 4 --sequences 4 --prefill-tokens 8 --adapters 1 4
              --rounds 1)
  DORA_ARGS=(--device cpu --kn 64 --r 4 --tokens 32 --rounds 1)
else
  T_CHECK="${T_CHECK:-75}" T_TESTS="${T_TESTS:-95}" T_OPS="${T_OPS:-80}"
  T_TUNE="${T_TUNE:-55}" T_E2E="${T_E2E:-55}" T_QLORA="${T_QLORA:-20}"
  T_MIXED="${T_MIXED:-15}" T_DORA="${T_DORA:-15}"
  MIXED_ARGS=(--device cuda --kn 4096 --r 16 --dtype bf16 --adapters 1 4 16 --rounds 5)
  DORA_ARGS=(--device cuda --kn 4096 --r 16 --dtype bf16 --tokens 1024 4096 --rounds 5)
  CHECK_ARGS=(--device cuda)
  BENCH_ARGS=(--device cuda)  # an error, not a silent CPU run, if torch sees no GPU
  TEST_ARGS=(-m gpu)
  # which backend is faster per shape, the table `auto` reads (llm_adapters/ops/_choice.py);
  # the cuda backend is named so that it takes part (auto alone skips an unloaded extension)
  TUNE_ARGS=(--device cuda --backends triton cuda torch --tokens 256 1024 4096 16384
             --hidden 4096 --rank 16 --dropout 0 0.05 --seconds $(( T_TUNE - 25 )))
  TUNE_ENV=(env)
fi
# The self-check and the tests check numerics, not speed: the Triton kernels take one config each
# there (LLM_ADAPTERS_TRITON_AUTOTUNE=0) instead of compiling and timing every candidate, which
# on a fresh machine would spend minutes of the budget; the op benchmarks below autotune (and
# check parity too). The self-check runs first: its table says at once whether each backend
# computes the right thing on this device, and the kernels it compiles are reused from
# Triton's cache by the tests. It does not start a JIT build of the CUDA extension (the cuda
# backend is checked when the extension is already built or cached).
CMD_CHECK=(env LLM_ADAPTERS_TRITON_AUTOTUNE="${LLM_ADAPTERS_TRITON_AUTOTUNE:-0}"
           timeout --kill-after=20 "$T_CHECK" "$PYTHON" -m llm_adapters.cli check
           "${CHECK_ARGS[@]}" --json "$OUT/check.json")
CMD_TESTS=(env LLM_ADAPTERS_TRITON_AUTOTUNE="${LLM_ADAPTERS_TRITON_AUTOTUNE:-0}"
           timeout --kill-after=20 "$T_TESTS" "$PYTHON" -m pytest "${TEST_ARGS[@]}" -q
           -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests)
CMD_OPS=(timeout --kill-after=20 "$T_OPS" "$PYTHON" -m llm_adapters.cli bench "${BENCH_ARGS[@]}"
         --out "$OUT")
CMD_TUNE=("${TUNE_ENV[@]}" timeout --kill-after=20 "$T_TUNE" "$PYTHON" -m llm_adapters.cli tune-backends
          "${TUNE_ARGS[@]}" --no-save --out "$OUT/backend_table.json")
CMD_E2E=(timeout --kill-after=20 "$T_E2E" "$PYTHON" -m llm_adapters.cli bench --e2e-only
         "${BENCH_ARGS[@]}" --out "$OUT")
# its own results file (the summary reads every *.jsonl of OUT_DIR) and loss plot
CMD_QLORA=(timeout --kill-after=20 "$T_QLORA" "$PYTHON" -m llm_adapters.cli bench --e2e-only
           --e2e-variants qlora --e2e-steps 10 "${BENCH_ARGS[@]}" --out "$OUT"
           --results-file "$OUT/qlora.jsonl")

# ---- the skinny LoRA kernels alone (shrink, expand, reduce_rows, grad_rows): GB/s, both variants
if [ "$MODE" = cpu ]; then  # the host emulation (after a JIT build of the extension): wiring only
  T_KERNELS="${T_KERNELS:-400}"
  KERNEL_ARGS=(--device cpu --m 64 300 --k 256 --r 16 --reps 2)
else
  T_KERNELS="${T_KERNELS:-40}"
  KERNEL_ARGS=(--device cuda --m 512 2048 8192 16384 --k 4096 --r 16 --dtype bfloat16)
fi
CMD_KERNELS=(timeout --kill-after=20 "$T_KERNELS" "$PYTHON" -m llm_adapters.bench.kernels
             "${KERNEL_ARGS[@]}" --out "$OUT")

CMD_MIXED=(timeout --kill-after=20 "$T_MIXED" "$PYTHON" benchmarks/bench_mixed.py "${MIXED_ARGS[@]}"
           --json "$OUT/bench-mixed.json")
CMD_DORA=(timeout --kill-after=20 "$T_DORA" "$PYTHON" benchmarks/bench_dora.py "${DORA_ARGS[@]}"
          --json "$OUT/bench-dora.json")

BUDGET=$(( T_CHECK + T_TESTS + T_KERNELS + T_OPS + T_TUNE + T_E2E + T_QLORA + T_MIXED + T_DORA ))
echo "part budgets: ${BUDGET} s (check $T_CHECK, tests $T_TESTS, kernels $T_KERNELS, ops $T_OPS, tune $T_TUNE, e2e $T_E2E, qlora $T_QLORA, mixed $T_MIXED, dora $T_DORA)"

declare -A RC SECS
run_part() {  # name logfile command...
  local name="$1" log="$2"; shift 2
  echo
  echo "== $name: $*"
  if [ "$MODE" = dry ]; then
    RC[$name]=dry; SECS[$name]=0
    return
  fi
  if [[ " $SKIP_PARTS " == *" $name "* ]]; then
    echo "   skipped (SKIP_PARTS)"
    RC[$name]=skip; SECS[$name]=0
    return
  fi
  local t0=$(date +%s)
  "$@" > "$log" 2>&1
  local rc=$?
  SECS[$name]=$(( $(date +%s) - t0 ))
  RC[$name]=$rc
  # the self-check's table is the first thing to read: all of it (60-odd rows on a GPU)
  if [ "$name" = check ]; then tail -n 120 "$log"; else tail -n 25 "$log"; fi
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "!! $name ran out of its ${SECS[$name]} s budget (see $log)"
  fi
}

run_part check "$OUT/check.log" "${CMD_CHECK[@]}"
run_part tests "$OUT/pytest-gpu.log" "${CMD_TESTS[@]}"
run_part kernels "$OUT/bench-kernels.log" "${CMD_KERNELS[@]}"
run_part ops "$OUT/bench-ops.log" "${CMD_OPS[@]}"
run_part tune "$OUT/tune-backends.log" "${CMD_TUNE[@]}"
run_part e2e "$OUT/bench-e2e.log" "${CMD_E2E[@]}"
run_part qlora "$OUT/bench-qlora.log" "${CMD_QLORA[@]}"
run_part mixed "$OUT/bench-mixed.log" "${CMD_MIXED[@]}"
run_part dora "$OUT/bench-dora.log" "${CMD_DORA[@]}"

# ---- the summary, last -------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START ))
echo
echo "== summary ($OUT, ${TOTAL} s in all)"
printf '%-6s %-12s %6s  %s\n' part status secs log
status=0
for part in check tests kernels ops tune e2e qlora mixed dora; do
  rc="${RC[$part]}"
  case "$rc" in
    0) st=ok ;;
    dry) st=dry-run ;;
    skip) st=skipped ;;
    124|137) st=TIMEOUT; status=1 ;;
    5) if [ "$part" = tests ]; then st="no-tests"; else st="rc=5"; status=1; fi ;;
    *) st="FAIL(rc=$rc)"; status=1 ;;
  esac
  case "$part" in
    check) log=check.log ;;
    tests) log=pytest-gpu.log ;;
    ops) log=bench-ops.log ;;
    tune) log=tune-backends.log ;;
    e2e) log=bench-e2e.log ;;
    qlora) log=bench-qlora.log ;;
    kernels) log=bench-kernels.log ;;
    mixed) log=bench-mixed.log ;;
    dora) log=bench-dora.log ;;
  esac
  printf '%-6s %-12s %6s  %s\n' "$part" "$st" "${SECS[$part]}" "$log"
done
if [ -s "$OUT/check.log" ]; then
  echo "self-check: $(grep -E 'passed, .* failed' "$OUT/check.log" | tail -n 1) (check.log, check.json)"
fi
if [ "$MODE" != dry ]; then
  "$PYTHON" -m llm_adapters.bench.summary "$OUT" 2>&1 || status=1
fi
echo "$status" > "$OUT/status"
exit $status
