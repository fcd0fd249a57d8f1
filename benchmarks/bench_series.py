"""Series bottleneck adapter benchmark: LLM-Adapters eager vs AdapterHub-style eager vs ours.

    python benchmarks/bench_series.py                   # default sizes for this device
    python benchmarks/bench_series.py --preset design   # DESIGN §7 grid (GPU)

Every flag of `llm-adapters bench` is accepted (see --help); this script fixes --op series.
The op is memory-bound: read the GB/s column against the device's bandwidth.
"""

import sys

from llm_adapters.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["--op", "series", *sys.argv[1:]]))
