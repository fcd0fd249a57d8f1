"""Benchmarks of the adapter ops and of adapter training (DESIGN §7).

`harness` runs providers (eager PyTorch, PEFT, our backends) on cases, with `timing`,
`memory`, `parity` (the float64 references and the DESIGN §6 rule, shared with the tests) and
`results` (rows, results file, table, plot); `lora` and `series` define the ops' providers and
counts; `e2e` trains a LLaMA-architecture model with each adapter; `cli` is
`llm-adapters bench`. The scripts in `benchmarks/` are thin wrappers over these.
"""

from .harness import Case, OpSpec, Provider, Runner, run_cases
from .results import Row
from .timing import Budget

__all__ = ["Budget", "Case", "OpSpec", "Provider", "Row", "Runner", "run_cases"]
