"""Benchmarks of the adapter ops and of adapter training (DESIGN §7).

`harness` times, measures memory and checks parity of providers (eager PyTorch, PEFT, our
backends) on cases; `lora` and `series` define the ops' providers and counts; `e2e` trains a
LLaMA-architecture model with each adapter; `cli` is `llm-adapters bench`. The scripts in
`benchmarks/` are thin wrappers over these.
"""

from .harness import Budget, Case, OpSpec, Provider, Row, Runner, run_cases

__all__ = ["Budget", "Case", "OpSpec", "Provider", "Row", "Runner", "run_cases"]
