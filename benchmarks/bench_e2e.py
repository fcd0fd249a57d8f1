"""End-to-end training benchmark: LoRA / AdapterH / parallel adapters on a random-weight
LLaMA-architecture model, ours vs PEFT (LoRA) and vs eager LLM-Adapters modules; and, when
asked for, QLoRA (the same model's linears in 4-bit NF4) ours vs PEFT.

    python benchmarks/bench_e2e.py                      # sizes for this device (GPU: ~1B, bf16)
    python benchmarks/bench_e2e.py --e2e-dropout 0.05   # with adapter dropout
    python benchmarks/bench_e2e.py --quick              # tiny model, seconds
    python benchmarks/bench_e2e.py --e2e-variants qlora # QLoRA: LoRA on a 4-bit NF4 base
                                                        # (bitsandbytes), ours vs PEFT

Every flag of `llm-adapters bench` is accepted; this script runs only the end-to-end part.
"""

import sys

from llm_adapters.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--e2e-only", *sys.argv[1:]]))
