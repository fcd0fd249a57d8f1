"""LoRA layer benchmark: eager vs PEFT vs the base GEMM vs our backends.

    python benchmarks/bench_lora.py                     # default sizes for this device
    python benchmarks/bench_lora.py --device cpu        # the README's CPU figure
    python benchmarks/bench_lora.py --preset design     # DESIGN §7's GPU grid

Every flag of `llm-adapters bench` is accepted (see --help); this script fixes --op lora.
"""

import sys

from llm_adapters.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--op", "lora", *sys.argv[1:]]))
