"""Training and saving under FSDP, two CPU processes (gloo) launched by torchrun.

One launch runs every scenario: FSDP1 (`FullyShardedDataParallel`, use_orig_params=True) with
the root as the only unit, with one unit per decoder layer, and with PEFT's auto-wrap policy
(every trainable leaf - lora_A, lora_B, adapter_down, adapter_up - a unit of its own), and FSDP2
(`fully_shard` per decoder layer and the root); each with LoRA, a series and a parallel
adapter, three AdamW steps on fixed batches, then `save_adapter`. The test compares the
losses and the saved files with the same steps in one process.
"""

from __future__ import annotations

import json
import os
import sys
import time

_T0 = time.perf_counter()

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402
from torchrun_helpers import (  # noqa: E402
    close_process_group,
    read_reports,
    run_torchrun,
    write_report,
)

import llm_adapters as la  # noqa: E402

KINDS = {
    "lora": lambda: la.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
    "series": lambda: la.BottleneckConfig(bottleneck_size=8),
    "parallel": lambda: la.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
}
SCENARIOS = ("fsdp1_root", "fsdp1_layers", "fsdp1_peft_policy", "fsdp2")
STEPS, BATCH, LENGTH = 3, 4, 10


def _model(kind):
    model = la.get_adapter_model(tiny_model("llama", seed=3), KINDS[kind]())
    torch.manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g) for _ in range(STEPS)]


def _train(model, step_model, rank=0, world=1):
    """STEPS AdamW steps; each rank takes its rows of every batch (no padding: equal tokens
    per row, so the mean of the ranks' losses is the loss of the whole batch)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for ids in _batches():
        ids = ids.chunk(world)[rank]
        loss = step_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


# ---- the torchrun worker (this file run as a script) -------------------------------------------
def _wrap(scenario, model):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    cpu = torch.device("cpu")
    if scenario == "fsdp1_root":
        return FullyShardedDataParallel(model, use_orig_params=True, device_id=cpu)
    if scenario == "fsdp1_layers":
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        return FullyShardedDataParallel(
            model, use_orig_params=True, device_id=cpu, auto_wrap_policy=policy
        )
    if scenario == "fsdp1_peft_policy":
        from peft.utils.other import fsdp_auto_wrap_policy

        policy = fsdp_auto_wrap_policy(model)
        return FullyShardedDataParallel(
            model, use_orig_params=True, device_id=cpu, auto_wrap_policy=policy
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _worker(out: str) -> None:
    import warnings

    import torch.distributed as dist

    import llm_adapters.models.io as io

    warnings.filterwarnings("ignore")  # FSDP1's notes on mixed requires_grad in one unit
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    writes = []
    real_save_file = io.save_file

    def counting_save_file(*args, **kwargs):
        writes.append(args[1])
        return real_save_file(*args, **kwargs)

    io.save_file = counting_save_file
    report = {"losses": {}, "writes": writes, "errors": {}, "seconds": {}}
    report["seconds"]["import"] = time.perf_counter() - _T0
    try:
        for scenario in SCENARIOS:
            for kind in KINDS:
                name = f"{scenario}-{kind}"
                start = time.perf_counter()
                model = _model(kind)
                wrapped = _wrap(scenario, model)
                losses = _train(wrapped, wrapped, rank, world)
                dist.all_reduce(losses)
                report["losses"][name] = (losses / world).tolist()
                # FSDP1: the wrapper is what gathers; FSDP2: the model itself
                la.save_adapter(wrapped, os.path.join(out, name))
                report["seconds"][name] = time.perf_counter() - start
        # a save that fails midway: a previous good save stays, a new folder never appears
        def failing_save_file(*args, **kwargs):
            raise OSError("disk full")

        io.save_file = failing_save_file
        for target in ("fsdp2-lora", "failed"):
            try:
                la.save_adapter(wrapped, os.path.join(out, target))
                report["errors"][target] = None
            except OSError as exc:
                report["errors"][target] = str(exc)
        io.save_file = counting_save_file
        # the frozen-base check still holds under FSDP1: a trainable base weight is refused
        model = _model("lora")
        layer = next(m for m in model.modules() if isinstance(m, la.LoraLinear))
        layer.base_layer.weight.requires_grad_(True)
        try:
            _train(*(2 * [_wrap("fsdp1_layers", model)]), rank, world)
            report["errors"]["trainable_base"] = None
        except ValueError as exc:
            report["errors"]["trainable_base"] = str(exc)
    finally:
        write_report(out, rank, report)
        close_process_group()


# ---- the tests -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    seconds = run_torchrun(__file__, out)
    return out, read_reports(out), seconds


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Losses and saved adapter of the same steps in one process, per kind."""
    out = tmp_path_factory.mktemp("single")
    results = {}
    for kind in KINDS:
        model = _model(kind)
        losses = _train(model, model)
        la.save_adapter(model, str(out / kind))
        results[kind] = (losses.tolist(), out / kind)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_trains_like_one_process(fsdp_run, single_process, scenario, kind):
    _, reports, _ = fsdp_run
    single, _ = single_process[kind]
    losses = reports[0]["losses"][f"{scenario}-{kind}"]
    assert len(losses) == STEPS
    # measured: at most 4.8e-7 apart (one float32 ulp at 4.6; sums in another order)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_fsdp_save_equals_one_process_save(fsdp_run, single_process, scenario, kind):
    out, _, _ = fsdp_run
    _, single_dir = single_process[kind]
    saved_dir = out / f"{scenario}-{kind}"
    assert sorted(os.listdir(saved_dir)) == sorted(os.listdir(single_dir))
    config = "adapter_config.json"
    with open(saved_dir / config) as a, open(single_dir / config) as b:
        assert json.load(a) == json.load(b)
    saved = load_file(saved_dir / "adapter_model.safetensors")
    single = load_file(single_dir / "adapter_model.safetensors")
    assert saved.keys() == single.keys() and single
    for key, t in single.items():
        assert saved[key].shape == t.shape, key
        # the same three steps; measured: at most 2.3e-7 apart (float32 rounding)
        torch.testing.assert_close(saved[key], t, rtol=0, atol=2e-6, msg=key)
    untrained = la.models.io._adapter_state(_model(kind))
    assert max((saved[k] - untrained[k]).abs().max() for k in saved) > 1e-3  # it trained
    # it loads, and holds what was saved
    loaded = la.load_adapter(tiny_model("llama", seed=3), str(saved_dir))
    again = la.models.io._adapter_state(loaded)
    assert again.keys() == saved.keys()
    assert all(torch.equal(again[k], saved[k]) for k in saved)


@pytest.mark.slow
def test_fsdp_only_rank_0_writes_and_failed_saves_leave_no_trace(fsdp_run):
    out, reports, seconds = fsdp_run
    n_saves = len(SCENARIOS) * len(KINDS)
    assert reports[1]["writes"] == []
    assert len(reports[0]["writes"]) == n_saves
    # on rank 0 the failing save raised; rank 1 (which writes nothing) returned normally
    assert reports[0]["errors"]["fsdp2-lora"] == "disk full"
    assert reports[0]["errors"]["failed"] == "disk full"
    assert reports[1]["errors"]["fsdp2-lora"] is None
    assert not (out / "failed").exists()
    good = load_file(out / "fsdp2-lora" / "adapter_model.safetensors")
    assert good  # the earlier save is intact and complete
    leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert leftovers == []
    assert seconds < 300


@pytest.mark.slow
def test_fsdp1_still_refuses_a_trainable_base_weight(fsdp_run):
    _, reports, _ = fsdp_run
    for report in reports:
        assert "base weight must be frozen" in (report["errors"]["trainable_base"] or "")


def test_trainable_base_weight_is_refused_without_fsdp():
    model = _model("lora")
    layer = next(m for m in model.modules() if isinstance(m, la.LoraLinear))
    layer.base_layer.weight.requires_grad_(True)
    ids = _batches()[0]
    with pytest.raises(ValueError, match="base weight must be frozen"):
        model(input_ids=ids, labels=ids)


def test_failed_save_keeps_the_previous_save_and_leaves_no_new_folder(tmp_path, monkeypatch):
    import llm_adapters.models.io as io

    model = _model("lora")
    la.save_adapter(model, str(tmp_path / "good"))
    (tmp_path / "good" / "README.md").write_text("kept")
    before = load_file(tmp_path / "good" / "adapter_model.safetensors")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def failing(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", failing)
    for target in ("good", "new"):
        with pytest.raises(OSError, match="disk full"):
            la.save_adapter(model, str(tmp_path / target))
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(tmp_path)) == ["good"]
    after = load_file(tmp_path / "good" / "adapter_model.safetensors")
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.undo()
    la.save_adapter(model, str(tmp_path / "good"))  # a save into an existing folder
    assert sorted(os.listdir(tmp_path / "good")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["good"]
    now = load_file(tmp_path / "good" / "adapter_model.safetensors")
    assert any(not torch.equal(now[k], before[k]) for k in before)


if __name__ == "__main__":
    _worker(sys.argv[1])
