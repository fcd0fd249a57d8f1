"""DoRA, one Linear layer: ours against PEFT's DoRA `lora.Linear` on the same weights.

    python benchmarks/bench_dora.py                         # CPU: K = N = 1024, r = 16
    python benchmarks/bench_dora.py --device cuda --kn 4096 --tokens 4096 --dtype bf16

Ours: `ops.dora_linear` as our DoRA layer calls it (the base weight's row norms ‖W_n‖² cached
once, the norm of W + s·B A from rank-sized products, one op for c ⊙ (x Wᵀ + s·B A x) + b; on
Triton the column scale is the GEMM's epilogue). PEFT: its `lora.Linear` with
`use_dora=True` (the norm from W + s·B A formed every forward). Modes: `forward` (no grad) and
`train` (forward and backward of a scalar loss, gradients of x, A, B and the magnitude), with
dropout off (PEFT's and our results are then the same function; they are compared before
timing). Both run in turns, order rotated every round, so other load on a shared machine falls
on both alike; medians of wall time and their ratio (PEFT / ours: above 1 means ours is
faster), with the machine's load beside them.
"""

from __future__ import annotations

import argparse

import torch

from llm_adapters import ops
from llm_adapters.bench.load import describe_load
from llm_adapters.bench.results import write_ab_json
from llm_adapters.bench.timing import medians_in_turns
from llm_adapters.ops.dora import weight_row_norm_sq

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _peft_layer(kn: int, r: int, device: str, dtype: torch.dtype):
    """PEFT's DoRA Linear over one K x N base with bias, trained-looking A, B and magnitude."""
    import peft

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(kn, kn, bias=True)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], use_dora=True)
    layer = peft.get_peft_model(holder, cfg).base_model.model.proj
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in (layer.lora_A["default"], layer.lora_B["default"]):
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.05)
        mag = layer.lora_magnitude_vector["default"].weight
        mag.mul_(1 + 0.1 * torch.randn(mag.shape, generator=gen))
    return layer.to(device, dtype)


def _params(layer):
    return (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight)


def _ours(layer):
    base = layer.get_base_layer()
    a, b, mag = _params(layer)
    scaling = float(layer.scaling["default"])
    wsq = weight_row_norm_sq(base.weight)  # what our layer caches while W is unchanged

    def run(x):
        return ops.dora_linear(x, base.weight, base.bias, a, b, mag, scaling=scaling,
                               weight_norm_sq=wsq)

    return run


def _step(fn, x, leaves):
    def run():
        y = fn(x)
        torch.autograd.grad(y.float().square().mean(), leaves)

    return run


def run_case(mode: str, m: int, kn: int, r: int, device: str, dtype: torch.dtype,
             rounds: int) -> dict:
    layer = _peft_layer(kn, r, device, dtype).eval()  # eval: PEFT's dropout is off anyway
    for p in layer.get_base_layer().parameters():
        p.requires_grad_(False)
    ours = _ours(layer)
    x = torch.randn(m, kn, device=device, dtype=dtype, requires_grad=(mode == "train"))
    leaves = (x, *_params(layer))
    with torch.no_grad():
        want, got = layer(x), ours(x)
    err = float((got.double() - want.double()).abs().max())
    scale = float(want.abs().max())
    tol = (1e-4 if dtype == torch.float32 else 2e-2) * scale
    assert err <= tol, f"ours and PEFT's differ by {err} (scale {scale})"
    if mode == "train":
        fns = {"ours": _step(ours, x, leaves), "peft": _step(layer, x, leaves)}
    else:
        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn(x)
            return run

        fns = {"ours": no_grad(ours), "peft": no_grad(layer)}
    med = medians_in_turns(fns, device, rounds)
    return {
        "mode": mode, "tokens": m, "K=N": kn, "r": r, "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": med["ours"] * 1e3, "peft_ms": med["peft"] * 1e3,
        "peft_over_ours": med["peft"] / med["ours"], "max_abs_diff": err,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kn", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--modes", nargs="+", choices=("forward", "train"),
                    default=["forward", "train"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--json", default=None, help="write the rows (and the machine) here")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    load = describe_load()
    rows = []
    print(f"load: {load}")
    print("mode     tokens   ours ms   PEFT ms   PEFT/ours   max|diff|")
    for mode in args.modes:
        for m in args.tokens:
            row = run_case(mode, m, args.kn, args.r, args.device, dtype, args.rounds)
            rows.append(row)
            print(f"{mode:8} {m:6} {row['ours_ms']:9.3f} {row['peft_ms']:9.3f}"
                  f" {row['peft_over_ours']:10.2f}x {row['max_abs_diff']:10.2e}")
    if args.json:
        write_ab_json(args.json, args.device, rows, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
