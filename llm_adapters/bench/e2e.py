"""End-to-end training benchmark: a LLaMA-architecture model (random weights) fine-tuned for a
fixed number of steps with each adapter, ours against the implementation users run today.

    LoRA on every linear      ours (`la.get_adapter_model`)   vs  PEFT (`get_peft_model`)
    AdapterH (series)         ours (BottleneckConfig)          vs  eager LLM-Adapters modules
    parallel adapter          ours (use_parallel_adapter)      vs  eager LLM-Adapters modules
    QLoRA (`qlora`, asked for by name): LoRA on every linear of the same model with those
    linears quantized to bitsandbytes 4-bit NF4, ours vs PEFT's bnb `Linear4bit` LoRA layer

Both sides of a pair start from the same base weights, the same adapter weights (copied from
ours into the other), see the same batches and use the same optimiser, so with dropout 0 their
loss curves must agree up to rounding: the report gives the largest |loss difference| over the
steps. Measured: tokens/s over the timed steps (after warm-up steps), the resident bytes of
the model's weights (for QLoRA: the packed 4-bit weights and their quantization state) and, on
a GPU, the peak memory of training above them.

The QLoRA base is the float model with every targeted decoder linear replaced by a
bitsandbytes `Linear4bit` (NF4, no double quantization, compute dtype = the model's dtype)
holding that weight quantized, and `is_loaded_in_4bit` set as a 4-bit `from_pretrained` sets
it (PEFT picks its bnb layer by it); the other parameters stay in the model's dtype and
frozen, on both sides alike. Both sides call the same quantized layers, so the pair differs
only in how the adapter branch is added: ours `ops.lora_add` into the layer's output, PEFT's
layer its own way.

The eager bottleneck modules follow LLM-Adapters' formulation: the adapter input is cast to the
adapter's dtype, adapter(h) = up(act(down(dropout(h)))) · s, added to h (series: on the input
of gate/up projections, on the output of the others; parallel: beside the linear, fed x).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import harness
from .memory import CudaPeak, saved_storages
from .results import append_results, load_now, pyplot, results_path, save_figure
from .timing import StepClock, quantiles

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "series", "parallel")  # what runs unless variants are named
QLORA = "qlora"
ALL_VARIANTS = (*VARIANTS, QLORA)


@dataclass
class E2EConfig:
    """Model size, batch and schedule. `for_device` picks sizes a device can hold."""

    hidden: int = 256
    intermediate: int = 688
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 2048
    dtype: str = "float32"
    batch: int = 2
    seq: int = 128
    steps: int = 6
    warmup: int = 2
    lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    bottleneck: int = 256
    dropout: float = 0.0
    seed: int = 0

    @staticmethod
    def for_device(device: torch.device, quick: bool = False) -> E2EConfig:
        if quick:
            return E2EConfig(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2,
                             vocab=256, batch=2, seq=32, steps=3, bottleneck=16,
                             lora_r=8, lora_alpha=16, warmup=2)
        if device.type == "cuda":
            # LLaMA-7B widths (4096 / 11008, 32 heads), 4 layers: about 1.0 B parameters
            return E2EConfig(hidden=4096, intermediate=11008, layers=4, heads=32, kv_heads=32,
                             vocab=32000, dtype="bfloat16", batch=4, seq=1024, steps=20,
                             warmup=3, lr=1e-4)
        return E2EConfig(bottleneck=64, steps=8)


@dataclass
class E2EResult:
    variant: str
    impl: str  # "ours" | "peft" | "eager"
    status: str = "ok"
    reason: Optional[str] = None
    backend: Optional[str] = None
    params: int = 0
    trainable: int = 0
    tokens_per_s: Optional[float] = None
    step_ms: Optional[float] = None
    step_p20_ms: Optional[float] = None
    step_p80_ms: Optional[float] = None
    step_cpu_ms: Optional[float] = None  # median process CPU time of a step (CPU devices)
    peak_bytes: Optional[int] = None
    saved_bytes: Optional[int] = None  # kept for backward by one forward (all devices)
    weights_bytes: Optional[int] = None  # resident parameters, buffers, quantization state
    losses: list[float] = field(default_factory=list)
    loss_max_abs_diff: Optional[float] = None  # vs the other side of the pair
    speedup: Optional[float] = None  # tokens/s over the other side's
    cpu_speedup: Optional[float] = None  # the other side's step CPU time over ours (CPU)
    mem_ratio: Optional[float] = None  # peak memory over the other side's
    load: Optional[dict[str, Any]] = None  # the machine's load before the pair trained


# --------------------------------------------------------------------------------------------
# Model and the eager bottleneck injector
# --------------------------------------------------------------------------------------------


def build_model(cfg: E2EConfig, device: torch.device) -> nn.Module:
    """A randomly initialised LlamaForCausalLM (seeded), in cfg.dtype on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=max(cfg.seq, 128),
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(harness.DTYPES[cfg.dtype])


def quantize_4bit(model: nn.Module, targets=ALL_LINEARS, quant_type: str = "nf4") -> nn.Module:
    """Replace every nn.Linear named in `targets` by a bitsandbytes Linear4bit holding its
    weight quantized (on the weight's device; compute dtype = the weight's dtype), freeze the
    model and mark it `is_loaded_in_4bit`. In place; returns `model`. ImportError without
    bitsandbytes."""
    from ..layers._quant import require_bitsandbytes

    bnb = require_bitsandbytes()
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if name in targets and type(child) is nn.Linear]
    if not swaps:
        raise ValueError(f"no nn.Linear named {', '.join(targets)} to quantize")
    for parent, name, child in swaps:
        w = child.weight
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=w.dtype, compress_statistics=False,
                              quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(w.data, requires_grad=False, compress_statistics=False,
                                     quant_type=quant_type)
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        setattr(parent, name, q.to(w.device))  # .to quantizes
    for p in model.parameters():
        p.requires_grad_(False)
    model.is_loaded_in_4bit = True
    return model


def resident_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers (unique storages; a 4-bit weight counts its
    packed bytes) plus the tensors of bitsandbytes quantization states (absmax, code, ...)."""
    seen: dict[tuple[int, int, str], int] = {}

    def add(t: Any) -> None:
        if isinstance(t, Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[(s.data_ptr(), s.nbytes(), str(t.device))] = s.nbytes()
        elif hasattr(t, "absmax") and hasattr(t, "blocksize"):  # a bnb QuantState
            for v in vars(t).values():
                add(v)

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        add(getattr(t, "quant_state", None))
    return sum(seen.values())


_ACT = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
        "identity": lambda t: t}


class EagerBottleneck(nn.Module):
    """LLM-Adapters' bottleneck adapter around a Linear, written with plain modules."""

    def __init__(self, base: nn.Module, down: nn.Linear, up: nn.Linear, placement: str,
                 activation: str, dropout: float, scaling: float) -> None:
        super().__init__()
        self.base_layer, self.adapter_down, self.adapter_up = base, down, up
        self.placement, self.act = placement, _ACT[activation]
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling

    def _adapter(self, h: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        """(adapter output, h in the adapter dtype, h's own dtype)."""
        dtype = h.dtype
        h = h.to(self.adapter_down.weight.dtype)
        out = self.adapter_up(self.act(self.adapter_down(self.adapter_dropout(h)))) * self.scaling
        return out, h, dtype

    def forward(self, x: Tensor) -> Tensor:
        if self.placement == "input":
            out, h, dtype = self._adapter(x)
            return self.base_layer((h + out).to(dtype))
        if self.placement == "output":
            y = self.base_layer(x)
            out, h, dtype = self._adapter(y)
            return (h + out).to(dtype)
        out, _, dtype = self._adapter(x)
        return self.base_layer(x) + out.to(dtype)


def eager_bottleneck_like(ours_model: nn.Module, base_copy: nn.Module) -> nn.Module:
    """Put an EagerBottleneck wherever `ours_model` has a BottleneckAdapter, with copies of its
    weights, into `base_copy` (an untouched copy of the same base model). Returns base_copy."""
    from ..layers import BottleneckAdapter

    modules = dict(base_copy.named_modules())
    for name, mod in ours_model.named_modules():
        if not isinstance(mod, BottleneckAdapter):
            continue
        parent_name, _, attr = name.rpartition(".")
        base = getattr(modules[parent_name], attr)
        scale = mod.scaling if mod.scaling is not None else float(mod.adapter_scale)
        new = EagerBottleneck(base, copy.deepcopy(mod.adapter_down), copy.deepcopy(mod.adapter_up),
                              mod.placement, mod.non_linearity, mod.adapter_dropout, scale)
        setattr(modules[parent_name], attr, new)
    for p in base_copy.parameters():
        p.requires_grad_(False)
    for m in base_copy.modules():
        if isinstance(m, EagerBottleneck):
            for p in (*m.adapter_down.parameters(), *m.adapter_up.parameters()):
                p.requires_grad_(True)
    return base_copy


def peft_like(ours_model: nn.Module, base_copy: nn.Module, cfg: E2EConfig) -> nn.Module:
    """PEFT LoRA on the same modules as `ours_model`, starting from its adapter weights."""
    import peft

    from ..layers import LoraLinear

    pc = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                         target_modules=list(ALL_LINEARS), task_type="CAUSAL_LM")
    model = peft.get_peft_model(base_copy, pc)
    theirs = dict(model.base_model.model.named_modules())
    copied = 0
    for name, mod in ours_model.named_modules():
        if isinstance(mod, LoraLinear):
            other = theirs[name]
            with torch.no_grad():
                other.lora_A["default"].weight.copy_(mod.lora_A.weight)
                other.lora_B["default"].weight.copy_(mod.lora_B.weight)
            copied += 1
    if copied == 0:
        raise RuntimeError("no LoRA layer found to copy into the PEFT model")
    return model


def ours_model(variant: str, base: nn.Module, cfg: E2EConfig) -> nn.Module:
    import llm_adapters as la

    if variant in ("lora", QLORA):
        config: Any = la.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                    lora_dropout=cfg.dropout, target_modules=list(ALL_LINEARS))
    elif variant == "series":
        config = la.BottleneckConfig(bottleneck_size=cfg.bottleneck, non_linearity="tanh",
                                     adapter_dropout=cfg.dropout)
    elif variant == "parallel":
        config = la.BottleneckConfig(bottleneck_size=cfg.bottleneck, non_linearity="tanh",
                                     adapter_dropout=cfg.dropout, use_parallel_adapter=True)
    else:
        raise ValueError(
            f"unknown variant {variant!r}: expected one of {', '.join(ALL_VARIANTS)}")
    torch.manual_seed(cfg.seed + 1)  # adapter init
    model = la.get_adapter_model(base, config)
    if variant in ("lora", QLORA):
        # B starts at zero; give it small values so the adapters shape the loss from step 0
        # and a wrong backward would show in the curves.
        gen = torch.Generator().manual_seed(cfg.seed + 2)
        for m in model.modules():
            if isinstance(m, la.LoraLinear):
                w = m.lora_B.weight
                with torch.no_grad():
                    w.copy_(torch.randn(w.shape, generator=gen).mul_(0.01))
    return model


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def batches(cfg: E2EConfig, device: torch.device, n: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(cfg.seed + 100)
    return [torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=gen).to(device)
            for _ in range(n)]


def train_pair(models: list[nn.Module], data: list[Tensor], cfg: E2EConfig,
               device: torch.device) -> list[tuple]:
    """Train the models side by side, one step each in turn (the order swapped every step, so
    background load and clock changes fall on both alike), each with its own AdamW.

    Returns per model: (loss per step, timed step milliseconds after the warm-up steps, peak
    bytes, process CPU milliseconds of the timed steps). The peak is the largest rise of GPU
    memory during one of its steps above what was allocated when the step began (activations,
    gradients, optimiser transients; the resident weights and optimiser state of both models
    are left out), None on a CPU.
    """
    cuda = device.type == "cuda"
    opts = []
    for model in models:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opts.append(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0))
    losses: list[list[float]] = [[] for _ in models]
    times: list[list[float]] = [[] for _ in models]
    cpu_times: list[list[float]] = [[] for _ in models]
    peaks: list[int] = [0 for _ in models]
    gens = [torch.Generator().manual_seed(cfg.seed + 3) for _ in models]
    for step, ids in enumerate(data):
        order = list(range(len(models)))
        if step % 2:
            order.reverse()
        for i in order:
            model, opt = models[i], opts[i]
            # each model draws its dropout masks from its own seeded stream
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gens[i])))
            with CudaPeak(device) as peak, StepClock(device) as clock:
                out = model(input_ids=ids, labels=ids)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = float(out.loss.detach())  # waits for the step
                del out
            if cuda:
                peaks[i] = max(peaks[i], peak.bytes)
            losses[i].append(loss)
            if step >= cfg.warmup:
                times[i].append(clock.wall_ms)
                cpu_times[i].append(clock.cpu_ms)
    del opts
    return [(losses[i], times[i], int(peaks[i]) if cuda else None, cpu_times[i])
            for i in range(len(models))]


def saved_bytes(model: nn.Module, ids: Tensor) -> int:
    """Bytes autograd keeps for backward over one training forward: unique storages packed by
    saved-tensor hooks, parameters and buffers left out. The memory figure on a CPU."""
    _, saved = saved_storages(lambda: model(input_ids=ids, labels=ids).loss,
                              (*model.parameters(), *model.buffers()))
    return sum(saved.values())


def _count(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def _pair_models(variant: str, base: nn.Module, cfg: E2EConfig) -> list[nn.Module]:
    """Ours and the reference for `variant`, both built before either trains (the reference
    starts from ours' initial adapter weights), each on its own copy of `base`."""
    if variant == QLORA:
        base = quantize_4bit(copy.deepcopy(base))
    ours = ours_model(variant, copy.deepcopy(base), cfg)
    if variant in ("lora", QLORA):
        return [ours, peft_like(ours.base_model, copy.deepcopy(base), cfg)]
    return [ours, eager_bottleneck_like(ours.base_model, copy.deepcopy(base))]


def _backend_name(variant: str, device: torch.device) -> str:
    from .. import ops

    # QLoRA: the branch added into the quantized layer's own output
    op = {"series": "series", QLORA: "lora_add"}.get(variant, "lora")
    return ops.resolve_backend(op, device).name


def run_e2e(
    cfg: E2EConfig, device: torch.device, variants=VARIANTS, log=print, on_pair=None
) -> list[E2EResult]:
    """Train every variant, ours and the reference, and return one result per run.
    `on_pair(pair)`, when given, gets each pair's two results as soon as they are complete.
    A QLoRA pair without bitsandbytes is reported as skipped, with the reason."""
    base = build_model(cfg, device)
    data = batches(cfg, device, cfg.warmup + cfg.steps)
    tokens = cfg.batch * cfg.seq
    results: list[E2EResult] = []
    for variant in variants:
        other_impl = "eager" if variant in ("series", "parallel") else "peft"
        pair = [E2EResult(variant, "ours"), E2EResult(variant, other_impl)]
        load = load_now()  # sampled while this process sleeps, before the pair trains
        for res in pair:
            res.load = load
        models: list[Optional[nn.Module]] = [None, None]
        try:
            models = _pair_models(variant, base, cfg)
            pair[0].backend = _backend_name(variant, device)
        except ImportError as exc:  # bitsandbytes (QLoRA) is optional
            for res in pair:
                res.status, res.reason = "skipped", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001  (reported, the other variants go on)
            for res in pair:
                res.status, res.reason = "error", f"building: {type(exc).__name__}: {exc}"
        if all(m is not None for m in models) and pair[0].status == "ok":
            try:
                for res, model in zip(pair, models, strict=True):
                    res.params, res.trainable = _count(model)
                    res.weights_bytes = resident_bytes(model)
                trained = train_pair(models, data, cfg, device)
                for res, model, (losses, times, peak, cpu) in zip(pair, models, trained,
                                                                  strict=True):
                    res.losses = losses
                    res.step_cpu_ms = quantiles(cpu)[1] if device.type == "cpu" else None
                    res.step_p20_ms, res.step_ms, res.step_p80_ms = quantiles(times)
                    res.tokens_per_s = tokens / (res.step_ms / 1e3)
                    res.peak_bytes = peak
                    res.saved_bytes = saved_bytes(model, data[0])
            except Exception as exc:  # noqa: BLE001
                for res in pair:
                    res.status, res.reason = "error", f"{type(exc).__name__}: {exc}"
        del models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for res in pair:
            log(_line(res))
        mine, other = pair
        if mine.status == other.status == "ok":
            diff = max(abs(a - b) for a, b in zip(mine.losses, other.losses, strict=True))
            mine.loss_max_abs_diff = other.loss_max_abs_diff = diff
            mine.speedup = mine.tokens_per_s / other.tokens_per_s
            if mine.step_cpu_ms and other.step_cpu_ms:
                mine.cpu_speedup = other.step_cpu_ms / mine.step_cpu_ms
            if mine.peak_bytes and other.peak_bytes:
                mine.mem_ratio = mine.peak_bytes / other.peak_bytes
            elif mine.saved_bytes and other.saved_bytes:
                mine.mem_ratio = mine.saved_bytes / other.saved_bytes
        results.extend(pair)
        if on_pair is not None:
            on_pair(pair)
    return results


def _line(r: E2EResult) -> str:
    if r.status != "ok":
        return f"  {r.variant:<9} {r.impl:<6} {r.status}: {r.reason}"
    peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.2f} GiB"
    saved = "-" if r.saved_bytes is None else f"{r.saved_bytes / 2**20:.1f} MiB"
    weights = "-" if r.weights_bytes is None else f"{r.weights_bytes / 2**20:.1f} MiB"
    cpu = "" if r.step_cpu_ms is None else f" cpu {r.step_cpu_ms:.1f} ms"
    return (f"  {r.variant:<9} {r.impl:<6} {r.tokens_per_s:10.0f} tok/s  "
            f"step {r.step_ms:.1f} ms{cpu} "
            f"(p20 {r.step_p20_ms:.1f}, p80 {r.step_p80_ms:.1f})  weights {weights}  "
            f"peak {peak}  saved {saved}  loss {r.losses[0]:.4f} -> {r.losses[-1]:.4f}")


def format_table(results: list[E2EResult], cfg: E2EConfig) -> str:
    lines = [
        f"end-to-end: LLaMA hidden={cfg.hidden} inter={cfg.intermediate} layers={cfg.layers} "
        f"vocab={cfg.vocab} {cfg.dtype}, batch {cfg.batch}x{cfg.seq}, {cfg.steps} timed steps "
        f"after {cfg.warmup}, dropout {cfg.dropout}",
        f"{'variant':<9} {'impl':<6} {'backend':<8} {'tok/s':>10} {'step ms':>9} "
        f"{'weights MiB':>11} {'peak GiB':>9} {'saved MiB':>9} {'speedup':>8} {'cpu spd':>8} "
        f"{'mem ratio':>9} {'max|dloss|':>11}",
        "(speedup: tokens/s over the other side's; cpu spd: the same from process CPU time per "
        "step (CPU); weights: resident parameters, buffers and quantization state; mem ratio: "
        "peak GPU memory above the weights, or on a CPU the bytes saved for backward, over "
        "the other side's)",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(f"{r.variant:<9} {r.impl:<6} {r.status}: {r.reason}")
            continue
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.3f}"
        saved = "-" if r.saved_bytes is None else f"{r.saved_bytes / 2**20:.1f}"
        sp = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        cs = "-" if r.cpu_speedup is None else f"{r.cpu_speedup:.2f}x"
        mr = "-" if r.mem_ratio is None else f"{r.mem_ratio:.2f}"
        dl = "-" if r.loss_max_abs_diff is None else f"{r.loss_max_abs_diff:.2e}"
        wb = "-" if r.weights_bytes is None else f"{r.weights_bytes / 2**20:.1f}"
        lines.append(f"{r.variant:<9} {r.impl:<6} {r.backend or '-':<8} {r.tokens_per_s:>10.0f} "
                     f"{r.step_ms:>9.1f} {wb:>11} {peak:>9} {saved:>9} {sp:>8} {cs:>8} {mr:>9} "
                     f"{dl:>11}")
    return "\n".join(lines)


def plot_losses(results: list[E2EResult], path: str, title: str = "") -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    ok = [r for r in results if r.status == "ok"]
    variants = sorted({r.variant for r in ok}, key=ALL_VARIANTS.index)
    if not variants:
        return None
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    for ax, v in zip(axes[0], variants, strict=False):
        for r in ok:
            if r.variant == v:
                style = "-" if r.impl == "ours" else "--"
                ax.plot(range(len(r.losses)), r.losses, style, marker=".", label=r.impl)
        ax.set_title(f"{v}: loss per step")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def to_records(results: list[E2EResult], cfg: E2EConfig, env: dict[str, Any]):
    out = []
    for r in results:
        rec: dict[str, Any] = {"kind": "e2e"}
        rec.update(env)
        rec.update({f"model_{k}": v for k, v in dataclasses.asdict(cfg).items()})
        rec.update(dataclasses.asdict(r))
        out.append(rec)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--e2e-steps", type=int, default=None, help="timed training steps")
    p.add_argument("--e2e-dropout", type=float, default=None, help="adapter dropout")
    p.add_argument("--e2e-variants", nargs="+", choices=ALL_VARIANTS, default=None,
                   help=f"pairs to train (default: {' '.join(VARIANTS)}; {QLORA}: LoRA on a "
                        "4-bit NF4 base, needs bitsandbytes)")
    p.add_argument("--e2e-layers", type=int, default=None, help="decoder layers")


def run_from_args(args: argparse.Namespace, device: torch.device, env: dict[str, Any]) -> int:
    """The --e2e part of `llm-adapters bench`: run, print, append results, plot losses."""
    cfg = E2EConfig.for_device(device, quick=getattr(args, "quick", False))
    if getattr(args, "e2e_steps", None):
        cfg.steps = args.e2e_steps
    if getattr(args, "e2e_dropout", None) is not None:
        cfg.dropout = args.e2e_dropout
    if getattr(args, "e2e_layers", None):
        cfg.layers = args.e2e_layers
    variants = getattr(args, "e2e_variants", None) or VARIANTS
    print(f"\n== end-to-end training: {', '.join(variants)} ==", flush=True)
    t0 = time.perf_counter()
    out = getattr(args, "out", os.path.join("benchmarks", "results"))
    path = getattr(args, "results_file", None) or results_path(out, device)
    write = not getattr(args, "no_write", False)

    def on_pair(pair: list[E2EResult]) -> None:  # per pair: a run cut short keeps its rows
        if write:
            append_results(path, to_records(pair, cfg, env))

    results = run_e2e(cfg, device, variants, log=lambda s: print(s, flush=True),
                      on_pair=on_pair)
    print("\n" + format_table(results, cfg))
    if write:
        print(f"results appended to {path}")
    if not getattr(args, "no_plot", False):
        png = plot_losses(results, os.path.splitext(path)[0] + "-e2e-loss.png",
                          title=f"{env['device_name']} | {env['date']}")
        if png:
            print(f"loss curves: {png}")
    print(f"end-to-end took {time.perf_counter() - t0:.1f} s")
    bad = [r for r in results if r.status != "ok"]  # a pair asked for that did not run, too
    # With dropout 0 the pair computes the same function: losses must agree to rounding.
    tol = 5e-2 if cfg.dtype != "float32" else 1e-3
    drift = [r for r in results if cfg.dropout == 0 and r.loss_max_abs_diff is not None
             and not (r.loss_max_abs_diff <= tol)]
    if drift:
        print(f"loss curves differ by more than {tol}: "
              + ", ".join(f"{r.variant}/{r.impl}" for r in drift))
    if any(not math.isfinite(x) for r in results for x in r.losses):
        print("non-finite loss")
        return 1
    return 1 if (bad or drift) else 0
