"""Mixed-adapter batches, one LoRA Linear: each row with its own adapter (inference).

    python benchmarks/bench_mixed.py                        # CPU: K = N = 1024, r = 16
    python benchmarks/bench_mixed.py --device cuda --kn 4096 --json out.json

Ours: the base product, then `ops.lora_grouped_add` (rows segmented by adapter; one shrink and
one expand launch on triton, a loop over segments on the torch backend). PEFT: its LoRA
Linear called with `adapter_names=` (peft's mixed-batch forward: one masked sub-batch per
adapter). Both on the same weights and rows, in turns, order rotated every round, so other
load on a shared machine falls on both alike; medians of wall time and their ratio (PEFT /
ours: above 1 means ours is faster). Before timing, the two outputs are compared.

Cases: a decode step (one token for each of B sequences) and a prefill (B sequences of T
tokens), with 1, 4 and 16 adapters spread round-robin over the sequences, and a quarter of the
sequences on the bare base ("__base__").
"""

from __future__ import annotations

import argparse

import torch

from llm_adapters import ops
from llm_adapters.bench.load import describe_load
from llm_adapters.bench.results import write_ab_json
from llm_adapters.bench.timing import medians_in_turns


def _peft_layer(kn: int, r: int, g: int, device: str, dtype: torch.dtype):
    """PEFT's LoRA Linear over one K x N base, with adapters a0..a{g-1} of rank r."""
    import peft

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(kn, kn, bias=False)
    cfg = lambda: peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])  # noqa: E731
    model = peft.get_peft_model(holder, cfg(), adapter_name="a0")
    for i in range(1, g):
        model.add_adapter(f"a{i}", cfg())
    layer = model.base_model.model.proj
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in layer.lora_A:
            for mod in (layer.lora_A[name], layer.lora_B[name]):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * 0.05)
    return layer.to(device, dtype).eval()


def _names(rows: int, per_seq: int, g: int) -> list[str]:
    seqs = rows // per_seq
    names = ["__base__" if s % 4 == 3 else f"a{s % g}" for s in range(seqs)]
    return [n for n in names for _ in range(per_seq)]


def _ours(layer, g: int):
    lora_as = [layer.lora_A[f"a{i}"].weight for i in range(g)]
    lora_bs = [layer.lora_B[f"a{i}"].weight for i in range(g)]
    scalings = [float(layer.scaling[f"a{i}"]) for i in range(g)]
    base = layer.get_base_layer()

    def run(x, index):
        return ops.lora_grouped_add(base(x), x, index, lora_as, lora_bs, scalings)

    return run


def run_case(kind: str, b: int, t: int, g: int, kn: int, r: int, device: str,
             dtype: torch.dtype, rounds: int) -> dict:
    per_seq = 1 if kind == "decode" else t
    rows = b * per_seq
    layer = _peft_layer(kn, r, g, device, dtype)
    names = _names(rows, per_seq, g)
    index = torch.tensor([-1 if n == "__base__" else int(n[1:]) for n in names],
                         dtype=torch.int64, device=device)
    x = torch.randn(rows, kn, device=device, dtype=dtype)
    ours = _ours(layer, g)
    with torch.no_grad():
        want = layer(x, adapter_names=names)
        got = ours(x, index)
        err = float((got.double() - want.double()).abs().max())
        scale = float(want.abs().max())
        assert err <= 1e-3 * scale, f"ours and PEFT's differ by {err} (scale {scale})"
        fns = {"ours": lambda: ours(x, index), "peft": lambda: layer(x, adapter_names=names)}
        med = medians_in_turns(fns, device, rounds)
    return {
        "case": kind, "sequences": b, "tokens_per_sequence": per_seq, "rows": rows,
        "adapters": g, "K=N": kn, "r": r, "dtype": str(dtype).replace("torch.", ""),
        "ours_ms": med["ours"] * 1e3, "peft_ms": med["peft"] * 1e3,
        "peft_over_ours": med["peft"] / med["ours"],
        "ours_tokens_per_s": rows / med["ours"], "max_abs_diff": err,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kn", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--json", default=None, help="write the rows (and the machine) here")
    args = ap.parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    load = describe_load()
    rows = []
    print(f"load: {load}")
    print("case     adapters  rows   ours ms   PEFT ms   PEFT/ours   max|diff|")
    for kind in ("decode", "prefill"):
        for g in args.adapters:
            row = run_case(kind, args.sequences, args.prefill_tokens, g, args.kn, args.r,
                           args.device, dtype, args.rounds)
            rows.append(row)
            print(f"{kind:8} {g:8} {row['rows']:5} {row['ours_ms']:9.3f} {row['peft_ms']:9.3f}"
                  f" {row['peft_over_ours']:10.2f}x {row['max_abs_diff']:10.2e}")
    if args.json:
        write_ab_json(args.json, args.device, rows, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
