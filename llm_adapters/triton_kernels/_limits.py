"""Shared-memory limits of the GPU targets the kernels are tuned for, and the config choice
every autotuned kernel makes from a shared-memory model (no device needed).

The limits are the opt-in maximum of dynamic shared memory per block: an A100 (sm_80) has
166,912 B, an H100 (sm_90) 232,448 B. A config whose compiled kernel needs more fails to launch
with OutOfResources, so the autotuner must never time one: each kernel module gives a model of
the bytes its compiled configs allocate (held against the compiler's numbers by
`llm_adapters.triton_kernels.aot` and tests/test_aot.py), and `choose` prunes with it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

# cc -> opt-in shared memory per block, bytes
TARGETS: dict[int, int] = {80: 166912, 90: 232448}


def autotune_enabled() -> bool:
    """False when LLM_ADAPTERS_TRITON_AUTOTUNE=0: one config per launch key, untimed."""
    return os.environ.get("LLM_ADAPTERS_TRITON_AUTOTUNE", "1") != "0"


@functools.cache
def _device_target(index: int) -> tuple[int, int]:
    import torch

    props = torch.cuda.get_device_properties(index)
    smem = int(getattr(props, "shared_memory_per_block_optin", TARGETS[80]))
    return props.major * 10 + props.minor, smem


def target_of(tensor) -> tuple[int, int] | None:
    """(compute capability as 80/90/..., shared-memory limit) of a CUDA tensor's device; None
    off a GPU (the interpreter has no limit)."""
    if tensor is None or tensor.device.type != "cuda":
        return None
    return _device_target(tensor.device.index if tensor.device.index is not None else 0)


def fewest_registers(configs: Sequence, words: Callable[[object], float], budget: int = 64) -> list:
    """The configs whose `words(config)` (fp32 registers per thread that a kernel without
    tensor cores keeps its accumulators and operand tiles in) is within `budget`, in list
    order; when none is, those with the fewest. IEEE fp32 kernels compile to FMA, and the AOT
    compiles (sm_80, sm_90) of configs past 64 words spilled up to 28 KB per thread, and the
    kept ones spill the least of their variant's configs, or under 1 KB."""
    configs = list(configs)
    if not configs:
        return configs
    cost = {id(c): words(c) for c in configs}
    ok = [c for c in configs if cost[id(c)] <= budget]
    if ok:
        return ok
    least = min(cost.values())
    return [c for c in configs if cost[id(c)] == least]


def choose(
    configs: Sequence,
    cost: Callable[[object, int], int],
    target: tuple[int, int] | None,
    autotune: bool | None = None,
) -> list:
    """The configs the autotuner may launch, given `cost(config, cc)` (modelled bytes of shared
    memory) and the target (cc, limit); None = no GPU, nothing pruned.

    Untuned (autotune False, default from the environment): the first config in list order
    that fits every target in TARGETS and the given one, so a run with
    LLM_ADAPTERS_TRITON_AUTOTUNE=0 takes the same config on an A100 and an H100. If none fits
    everywhere, the first that fits the given target; the cheapest as a last resort (its
    launch error then names the problem)."""
    configs = list(configs)
    if autotune is None:
        autotune = autotune_enabled()
    cc = target[0] if target is not None else 80

    def fits(c, tcc, limit):
        return cost(c, tcc) <= limit

    if not autotune:
        for c in configs:
            if all(fits(c, t, lim) for t, lim in TARGETS.items()) and (
                target is None or fits(c, *target)
            ):
                return [c]
        if target is not None:
            for c in configs:
                if fits(c, *target):
                    return [c]
        return [min(configs, key=lambda c: cost(c, cc))]
    if target is None:
        return configs
    ok = [c for c in configs if fits(c, *target)]
    return ok or [min(configs, key=lambda c: cost(c, cc))]
